//! A PostgreSQL server of a test's own, started by `scripts/pg-test-server`.

/// A PostgreSQL server of this test's own (the shared one of the store
/// tests must not be stopped under them), on a port that stays the same
/// across restarts so the control plane's URL keeps working.
pub struct OwnPostgres {
    dir: tempfile::TempDir,
    port: String,
}

impl OwnPostgres {
    fn script() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/pg-test-server")
    }

    pub fn start() -> (OwnPostgres, String) {
        let dir = tempfile::Builder::new()
            .prefix("airlock-pg-")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        let out = std::process::Command::new(Self::script())
            .arg(dir.path())
            .output()
            .expect("pg-test-server");
        assert!(
            out.status.success(),
            "PostgreSQL did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let port = url
            .rsplit(':')
            .next()
            .and_then(|p| p.split('/').next())
            .expect("a port")
            .to_owned();
        (OwnPostgres { dir, port }, url)
    }

    pub fn stop(&self) {
        let status = std::process::Command::new(Self::script())
            .arg("--stop")
            .arg(self.dir.path())
            .status()
            .expect("pg-test-server --stop");
        assert!(status.success());
    }

    pub fn restart(&self) {
        let out = std::process::Command::new(Self::script())
            .arg(self.dir.path())
            .env("PGPORT_TEST", &self.port)
            .output()
            .expect("pg-test-server");
        assert!(
            out.status.success(),
            "PostgreSQL did not start again: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}
