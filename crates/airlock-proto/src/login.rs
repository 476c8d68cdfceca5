//! Login capture between the control plane and the agent: the provider
//! definition the agent runs, and what it reports back.
//!
//! A provider is data: the control plane reads the definitions (the files under
//! `/etc/airlock/providers/` of the image) and sends the one it wants run with
//! the start request, so the agent needs no parser for them and no second copy.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One CLI's way of signing in. Written as TOML by people, so unknown fields
/// are refused.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProviderDef {
    /// `codex`, `claude`, `gemini`, …: the name in `POST /logins`.
    pub name: String,
    /// Shown on the Connect button.
    pub display_name: String,
    /// The CLI's own login command, run as the sandbox user under a PTY in its home.
    pub command: Vec<String>,
    /// Laid over the agent's environment. `{gateway}` in a value becomes the
    /// sandbox's gateway address.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A login URL starts with one of these (scheme, host and path).
    pub url_prefixes: Vec<String>,
    /// Where the sign-in URL comes from and what else it must hold.
    #[serde(default)]
    pub url: UrlRule,
    /// Prompts the CLI shows and what to type at each.
    #[serde(default)]
    pub prompts: Vec<Prompt>,
    /// Text after which the CLI waits for a code pasted by the user, seen on
    /// its screen.
    #[serde(default)]
    pub code_prompt: Option<String>,
    /// What the CLI writes when signed in, relative to the user's home.
    pub credentials: Vec<CredentialFile>,
    /// Run in the workspace after delivery; exit 0 means signed in.
    #[serde(default)]
    pub check: Option<Vec<String>>,
    /// Number of columns of the PTY: wide, so URLs never wrap.
    #[serde(default = "default_cols")]
    pub cols: u16,
}

fn default_cols() -> u16 {
    500
}

/// Which URL is a provider's sign-in URL. No timing decides it: a URL that
/// does not come from [`UrlRule::from`] or lacks what the rule asks for is
/// never opened nor reported.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UrlRule {
    /// Where the CLI hands its URL over.
    #[serde(default)]
    pub from: UrlSource,
    /// Query parameters that must be present and non-empty.
    #[serde(default)]
    pub params: Vec<String>,
    /// Query parameters that must have exactly this value.
    #[serde(default)]
    pub values: BTreeMap<String, String>,
    /// The `redirect_uri` parameter starts with one of these (empty: any).
    #[serde(default)]
    pub redirect_prefixes: Vec<String>,
    /// With `from = "browser_hook"`: once the screen shows a link, how long
    /// the hook may take to be called before the login fails (the screen's
    /// link is never taken instead).
    #[serde(default = "default_hook_wait_s")]
    pub hook_wait_s: u32,
}

impl Default for UrlRule {
    fn default() -> Self {
        UrlRule {
            from: UrlSource::default(),
            params: Vec::new(),
            values: BTreeMap::new(),
            redirect_prefixes: Vec::new(),
            hook_wait_s: default_hook_wait_s(),
        }
    }
}

fn default_hook_wait_s() -> u32 {
    20
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UrlSource {
    /// What the CLI asks a browser to open (`BROWSER`, `xdg-open`): exactly
    /// what a browser would get.
    #[default]
    BrowserHook,
    /// What the CLI draws on its screen (a CLI that opens no browser).
    Screen,
}

impl UrlSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UrlSource::BrowserHook => "browser hook",
            UrlSource::Screen => "screen",
        }
    }
}

impl UrlRule {
    /// Why `url` (already known to start with one of the provider's
    /// prefixes) is not a sign-in URL under this rule, or `None`.
    pub fn refuses(&self, url: &str) -> Option<String> {
        let query = url.split_once('?').map(|(_, q)| q).unwrap_or("");
        let query = query.split('#').next().unwrap_or("");
        let get = |name: &str| -> Option<String> {
            query.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (decode(k) == name).then(|| decode(v))
            })
        };
        let missing: Vec<&str> = self
            .params
            .iter()
            .filter(|p| get(p).is_none_or(|v| v.is_empty()))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Some(format!("no {}", missing.join(", ")));
        }
        for (k, want) in &self.values {
            match get(k) {
                Some(v) if v == *want => {}
                Some(v) => return Some(format!("{k} is {v:?}, not {want:?}")),
                None => return Some(format!("no {k}")),
            }
        }
        if !self.redirect_prefixes.is_empty() {
            let r = get("redirect_uri").unwrap_or_default();
            if !self.redirect_prefixes.iter().any(|p| r.starts_with(p)) {
                return Some(format!(
                    "redirect_uri {r:?} does not start with {}",
                    self.redirect_prefixes.join(" or ")
                ));
            }
        }
        None
    }

    fn validate(&self) -> Result<(), String> {
        let bad_name =
            |n: &str| n.is_empty() || n.len() > 64 || !n.bytes().all(|b| b.is_ascii_graphic());
        if self.params.iter().any(|p| bad_name(p)) || self.values.keys().any(|k| bad_name(k)) {
            return Err("url: parameter names must be 1 to 64 visible characters".into());
        }
        if self
            .redirect_prefixes
            .iter()
            .any(|p| !(p.starts_with("https://") || p.starts_with("http://")))
        {
            return Err("url.redirect_prefixes: each http:// or https://".into());
        }
        if !(1..=600).contains(&self.hook_wait_s) {
            return Err("url.hook_wait_s: between 1 and 600".into());
        }
        Ok(())
    }
}

/// `%XX` and `+` of a query component decoded (lossy on bad UTF-8).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Prompt {
    /// Seen on the screen as the terminal draws it (wrapped rows joined, runs
    /// of whitespace as one space).
    pub expect: String,
    /// Typed into the PTY; `\r` is Enter.
    pub send: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CredentialFile {
    /// Relative to the home directory, without `..`.
    pub path: String,
    /// Dotted keys that must be present for the file to count (it must be JSON
    /// then); empty: any non-empty file counts.
    #[serde(default)]
    pub json_keys: Vec<String>,
    /// Dotted JSON key whose value says when the credentials expire (the
    /// control plane's health check reads it); unset: the file states none.
    #[serde(default)]
    pub expiry_key: Option<String>,
    /// How the value at `expiry_key` reads; required with it.
    #[serde(default)]
    pub expiry_format: Option<ExpiryFormat>,
    /// Dotted JSON key of the refresh token: while it holds a non-empty
    /// string the CLI can renew its access by itself; empty or gone means
    /// the CLI gave up on it (a refused refresh).
    #[serde(default)]
    pub refresh_key: Option<String>,
}

/// How a credential file writes its expiry.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ExpiryFormat {
    /// A number: milliseconds since the Unix epoch.
    UnixMs,
    /// A number: seconds since the Unix epoch.
    UnixS,
    /// A string: an RFC 3339 time.
    Rfc3339,
    /// A string: a JSON Web Token whose `exp` claim (seconds since the
    /// epoch) is the expiry. Its signature is not checked: only the time is read.
    JwtExp,
}

impl ProviderDef {
    /// Problems a definition must not have, named by field.
    pub fn validate(&self) -> Result<(), String> {
        let ok_name = !self.name.is_empty()
            && self.name.len() <= 32
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok_name {
            return Err("name: lowercase letters, digits and '-', at most 32".into());
        }
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err("command: must name a program".into());
        }
        if self.url_prefixes.is_empty()
            || self
                .url_prefixes
                .iter()
                .any(|p| !(p.starts_with("https://") || p.starts_with("http://")))
        {
            return Err("url_prefixes: at least one, each http:// or https://".into());
        }
        if self.credentials.is_empty() {
            return Err("credentials: at least one file".into());
        }
        for c in &self.credentials {
            if !safe_relative(&c.path) || c.path.contains('\n') {
                return Err(format!(
                    "credentials: {:?} must be relative to home, without '..'",
                    c.path
                ));
            }
            if c.expiry_key.is_some() != c.expiry_format.is_some() {
                return Err(format!(
                    "credentials: {:?}: expiry_key and expiry_format go together",
                    c.path
                ));
            }
            let dotted = [c.expiry_key.as_deref(), c.refresh_key.as_deref()];
            if dotted
                .iter()
                .flatten()
                .any(|k| k.is_empty() || k.split('.').any(str::is_empty))
            {
                return Err(format!(
                    "credentials: {:?}: expiry_key and refresh_key are dotted keys without empty parts",
                    c.path
                ));
            }
        }
        if self.prompts.iter().any(|p| p.expect.trim().is_empty()) {
            return Err("prompts: expect must not be empty".into());
        }
        if !(80..=1000).contains(&self.cols) {
            return Err("cols: between 80 and 1000".into());
        }
        self.url.validate()
    }
}

/// A path inside the home directory: relative, no `..`, no empty parts.
pub fn safe_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..")
        && !path.contains('\0')
}

/// `POST /login`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LoginStart {
    pub login_id: String,
    pub provider: ProviderDef,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AgentLoginPhase {
    /// The command runs; no URL yet.
    Running,
    /// The URL is open in the browser; waiting for the user.
    AwaitingUser,
    /// Every credential file is present and valid.
    Captured,
    /// The command ended without credentials, or could not start.
    Failed,
}

/// `GET /login/{id}`: no secrets in here.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoginStatus {
    pub login_id: String,
    pub phase: AgentLoginPhase,
    pub login_url: Option<String>,
    /// The CLI shows its code prompt: a code typed through `POST /login/{id}/input` is expected.
    #[serde(default)]
    pub awaiting_code: bool,
    pub error: Option<String>,
    /// While `running`: what the command is at (absent from older agents).
    #[serde(default)]
    pub step: Option<AgentStep>,
    /// While `running`: what the command showed that was no sign-in URL (a
    /// shortened link on screen, a URL refused by the provider's rule), for
    /// a failure's reason.
    #[serde(default)]
    pub seen: Option<String>,
}

/// Where a running login command is, before its URL.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AgentStep {
    /// Started; it has drawn nothing yet.
    CliStart,
    /// It shows its prompts; not every one is answered yet.
    Prompts,
    /// Everything answered: waiting for its sign-in URL.
    Url,
}

/// One credential file, read by the agent (`GET /login/{id}/credentials`) or
/// written by it (`POST /credentials/deliver`). The contents are secret: this
/// type prints none of them.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileBlob {
    pub path: String,
    /// Base64 (standard alphabet, padded).
    pub contents_b64: String,
}

impl std::fmt::Debug for FileBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileBlob")
            .field("path", &self.path)
            .field("contents_b64", &"[redacted]")
            .finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileSet {
    pub files: Vec<FileBlob>,
}

/// `POST /login/{id}/input`: a code the user pasted; Enter is added.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LoginInput {
    pub text: String,
}

impl std::fmt::Debug for LoginInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoginInput([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        for ok in [".codex/auth.json", "a", ".gemini/oauth_creds.json"] {
            assert!(safe_relative(ok), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../x", "a/../b", "a//b", "./a", "a/"] {
            assert!(!safe_relative(bad), "{bad}");
        }
    }

    fn rule() -> UrlRule {
        UrlRule {
            params: vec!["client_id".into(), "code_challenge".into()],
            values: [("response_type".to_owned(), "code".to_owned())].into(),
            redirect_prefixes: vec!["http://127.0.0.1:".into()],
            ..UrlRule::default()
        }
    }

    #[test]
    fn a_url_must_hold_what_its_rule_asks_for() {
        let r = rule();
        let good = "https://a.example/auth?response_type=code&client_id=c%201&code_challenge=x&redirect_uri=http%3A%2F%2F127.0.0.1%3A1455%2Fcb";
        assert_eq!(r.refuses(good), None);
        let no_client = good.replace("client_id=c%201&", "");
        assert_eq!(r.refuses(&no_client).as_deref(), Some("no client_id"));
        let empty = good.replace("client_id=c%201", "client_id=");
        assert_eq!(r.refuses(&empty).as_deref(), Some("no client_id"));
        let token = good.replace("response_type=code", "response_type=token");
        assert!(r
            .refuses(&token)
            .is_some_and(|w| w.contains("response_type")));
        let away = good.replace("127.0.0.1", "evil.example");
        assert!(r.refuses(&away).is_some_and(|w| w.contains("redirect_uri")));
        // claude-code's shortened link: nothing of it.
        let short = "https://claude.ai/oauth/authorize?z-abc";
        assert_eq!(
            r.refuses(short).as_deref(),
            Some("no client_id, code_challenge")
        );
        // A bad escape or a multibyte character never panics.
        assert!(r.refuses("https://a/?client_id=%E2%8&%").is_some());
        assert!(r.refuses("https://a/?client_id=%é").is_some());
    }

    #[test]
    fn the_image_rule_fields_are_checked() {
        let mut d = ProviderDef {
            name: "x".into(),
            display_name: "X".into(),
            command: vec!["x".into()],
            env: BTreeMap::new(),
            url_prefixes: vec!["https://a/".into()],
            url: rule(),
            prompts: vec![],
            code_prompt: None,
            credentials: vec![CredentialFile {
                path: "a".into(),
                ..Default::default()
            }],
            check: None,
            cols: 200,
        };
        assert_eq!(d.validate(), Ok(()));
        d.url.hook_wait_s = 0;
        assert!(d.validate().is_err_and(|e| e.contains("hook_wait_s")));
        d.url = rule();
        d.url.redirect_prefixes = vec!["ftp://x".into()];
        assert!(d.validate().is_err_and(|e| e.contains("redirect_prefixes")));
        d.url = rule();
        d.url.params = vec!["".into()];
        assert!(d.validate().is_err());
        let toml_rule: Result<UrlRule, _> = serde_json::from_str(r#"{"from":"screen","what":1}"#);
        assert!(toml_rule.is_err(), "unknown fields are refused");
    }

    #[test]
    fn expiry_and_refresh_keys_are_checked() {
        let def = |c: CredentialFile| ProviderDef {
            name: "x".into(),
            display_name: "X".into(),
            command: vec!["x".into()],
            env: BTreeMap::new(),
            url_prefixes: vec!["https://x/".into()],
            url: rule(),
            prompts: vec![],
            code_prompt: None,
            credentials: vec![c],
            check: None,
            cols: 200,
        };
        let good = CredentialFile {
            path: ".x/c.json".into(),
            expiry_key: Some("a.b".into()),
            expiry_format: Some(ExpiryFormat::UnixMs),
            refresh_key: Some("r".into()),
            ..Default::default()
        };
        assert_eq!(def(good.clone()).validate(), Ok(()));
        for bad in [
            CredentialFile {
                expiry_format: None,
                ..good.clone()
            },
            CredentialFile {
                expiry_key: None,
                ..good.clone()
            },
            CredentialFile {
                expiry_key: Some("a..b".into()),
                ..good.clone()
            },
            CredentialFile {
                refresh_key: Some(String::new()),
                ..good.clone()
            },
        ] {
            let err = def(bad.clone()).validate().expect_err("refused");
            assert!(err.starts_with("credentials:"), "{bad:?}: {err}");
        }
        let parsed: CredentialFile =
            serde_json::from_str(r#"{"path":"a","expiry_key":"e","expiry_format":"jwt_exp"}"#)
                .expect("json");
        assert_eq!(parsed.expiry_format, Some(ExpiryFormat::JwtExp));
    }

    #[test]
    fn blobs_never_print_contents() {
        let b = FileBlob {
            path: "p".into(),
            contents_b64: "c2VjcmV0".into(),
        };
        assert!(!format!("{b:?}").contains("c2VjcmV0"));
        let i = LoginInput {
            text: "code-123".into(),
        };
        assert!(!format!("{i:?}").contains("code-123"));
    }
}
