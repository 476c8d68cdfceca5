//! Login URLs: which URL a provider's login may hand over, and finding one
//! in what the command shows.

use airlock_proto::login::ProviderDef;

pub(super) fn matches_prefix(def: &ProviderDef, url: &str) -> bool {
    def.url_prefixes.iter().any(|p| url.starts_with(p.as_str()))
        && url.len() <= 8192
        && !url.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// The first URL in stripped output that starts with one of the prefixes.
pub fn find_url(def: &ProviderDef, text: &str) -> Option<String> {
    def.url_prefixes.iter().find_map(|p| {
        let start = text.find(p.as_str())?;
        let url: String = text[start..]
            .chars()
            .take_while(|c| !c.is_whitespace() && !c.is_control())
            .collect();
        // Only a URL followed by something is complete: output may arrive in pieces.
        let complete = text.len() > start + url.len();
        complete.then_some(url)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_proto::login::{CredentialFile, Prompt};

    fn def() -> ProviderDef {
        ProviderDef {
            name: "t".into(),
            display_name: "T".into(),
            command: vec!["sh".into()],
            env: Default::default(),
            url_prefixes: vec!["https://auth.example/authorize?".into()],
            prompts: vec![Prompt {
                expect: "trust  this".into(),
                send: "\\r".into(),
            }],
            code_prompt: None,
            credentials: vec![CredentialFile {
                path: ".t/creds.json".into(),
                json_keys: vec!["tokens.access".into()],
            }],
            check: None,
            cols: 200,
        }
    }

    #[test]
    fn urls_only_when_complete() {
        let d = def();
        assert_eq!(
            find_url(&d, "go to https://auth.example/authorize?a=b"),
            None
        );
        assert_eq!(
            find_url(&d, "go to https://auth.example/authorize?a=b\r\n").as_deref(),
            Some("https://auth.example/authorize?a=b")
        );
        assert_eq!(find_url(&d, "https://evil.example/authorize?a\n"), None);
    }
}
