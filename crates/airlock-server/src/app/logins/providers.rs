//! The provider definitions: the files under `etc/airlock/providers/` of the
//! golden image (the very bytes embedded in this binary's image recipe, so the
//! control plane and the image agree), plus any from a configured directory.

use airlock_proto::login::ProviderDef;
use std::path::Path;

const IMAGE_PREFIX: &str = "rootfs/etc/airlock/providers/";

#[derive(Debug, Default, Clone)]
pub struct Providers {
    list: Vec<ProviderDef>,
}

fn parse(text: &str, origin: &str) -> Result<ProviderDef, String> {
    let def: ProviderDef = toml::from_str(text).map_err(|e| format!("{origin}: {e}"))?;
    def.validate().map_err(|e| format!("{origin}: {e}"))?;
    Ok(def)
}

impl Providers {
    /// The image's definitions, then those of `extra` (which may replace one
    /// by name). Errors name the file and the field.
    pub fn load(extra: Option<&Path>) -> Result<Self, String> {
        let mut list: Vec<ProviderDef> = Vec::new();
        for f in airlock_image::inputs::embedded_files() {
            if let Some(name) = f.path.strip_prefix(IMAGE_PREFIX) {
                if name.ends_with(".toml") {
                    let text = std::str::from_utf8(f.contents)
                        .map_err(|_| format!("image/{}: not UTF-8", f.path))?;
                    list.push(parse(text, &format!("image/{}", f.path))?);
                }
            }
        }
        if let Some(dir) = extra {
            let mut paths: Vec<_> = std::fs::read_dir(dir)
                .map_err(|e| format!("{}: {e}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            paths.sort();
            for p in paths {
                let text =
                    std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                let def = parse(&text, &p.display().to_string())?;
                list.retain(|d| d.name != def.name);
                list.push(def);
            }
        }
        Ok(Providers { list })
    }

    pub fn get(&self, name: &str) -> Option<&ProviderDef> {
        self.list.iter().find(|p| p.name == name)
    }

    pub fn list(&self) -> &[ProviderDef] {
        &self.list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_defines_the_three_clis() {
        let p = Providers::load(None).expect("valid definitions");
        let names: Vec<&str> = p.list().iter().map(|d| d.name.as_str()).collect();
        for want in ["claude", "codex", "gemini"] {
            assert!(names.contains(&want), "{names:?}");
        }
        assert!(
            !names.iter().any(|n| n.contains("test")),
            "no test provider ships in the image: {names:?}"
        );
    }

    #[test]
    fn bad_definitions_name_the_file_and_field() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(
            dir.path().join("x.toml"),
            "name = \"x\"\ndisplay_name = \"X\"\ncommand = [\"x\"]\nurl_prefixes = [\"ftp://a\"]\ncredentials = [{ path = \"a\" }]\n",
        )
        .expect("write");
        let err = Providers::load(Some(dir.path())).expect_err("invalid");
        assert!(
            err.contains("x.toml") && err.contains("url_prefixes"),
            "{err}"
        );
        std::fs::write(dir.path().join("x.toml"), "name = \"x\"\nwhat = 1\n").expect("write");
        let err = Providers::load(Some(dir.path())).expect_err("unknown field");
        assert!(err.contains("what"), "{err}");
    }
}
