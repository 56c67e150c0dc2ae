//! Harness for the end-to-end tests: starts the real `prefix-rft` binary on port 0 with the
//! real SmolLM2 model and hands out its base URL.
//!
//! The binary is found next to the test executable (`target/<profile>/prefix-rft`), which
//! `cargo test --workspace --all-targets` builds before any test runs; `PREFIX_RFT_BIN`
//! overrides that. The model is `models/SmolLM2-135M-Instruct.Q4_1.gguf`, which
//! `scripts/test` fetches first.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The base model id of the embedded config.
pub const MODEL: &str = "smollm2-135m-instruct";
/// A tenant key of the embedded config.
pub const ACME_KEY: &str = "sk-acme-demo";
/// Another tenant's key.
pub const GLOBEX_KEY: &str = "sk-globex-demo";
/// The admin key.
pub const ADMIN_KEY: &str = "sk-admin-demo";

/// How long a server may take to load the model and answer `/ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// The repository root (the server runs there so the config's relative model path resolves).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// How many kill -9 trials a durability test runs: `default` in the suite, or the count in the
/// environment variable `var` (`scripts/reliability.py kill9` and `scripts/soak-feedback` raise it).
pub fn kill_trials(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The repository's `config.toml` (the embedded default), for tests that change a few lines.
pub fn repo_config() -> String {
    std::fs::read_to_string(repo_root().join("config.toml")).expect("config.toml")
}

/// The directory the plugin libraries of this build are in (next to the binary), checked to
/// hold each of `libs` (file names).
pub fn plugin_dir(libs: &[&str]) -> PathBuf {
    let dir = binary().parent().expect("target dir").to_path_buf();
    for lib in libs {
        let so = dir.join(lib);
        assert!(
            so.is_file(),
            "{} missing: scripts/test builds the plugin crates first",
            so.display()
        );
    }
    dir
}

/// `config` with `[server] plugin_dir` pointing at `dir`.
pub fn with_plugin_dir(config: &str, dir: &std::path::Path) -> String {
    let from = "plugin_dir = \"target/release\"";
    assert!(config.contains(from), "the config has no `{from}`");
    config.replace(
        from,
        &format!("plugin_dir = {:?}", dir.display().to_string()),
    )
}

/// The `prefix-rft` binary of this build.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PREFIX_RFT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/prefix-rft
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join(format!("prefix-rft{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} not found: run `cargo test --workspace --all-targets` (or `cargo build -p prefix-rft-server`) first",
        bin.display()
    );
    bin
}

/// The generation backend the suite runs against: `PREFIX_RFT_TEST_BACKEND` (`engine` or
/// `mistralrs`; the binary must be built with `--features mistralrs` for the latter), `None`
/// when unset (the config decides).
pub fn backend() -> Option<String> {
    std::env::var("PREFIX_RFT_TEST_BACKEND")
        .ok()
        .filter(|b| !b.is_empty())
}

/// True when the suite runs against the mistralrs backend (`tests/backends.rs` runs only
/// then; `scripts/test` runs just the OpenAI tests and that one against it).
pub fn on_mistralrs() -> bool {
    backend().as_deref() == Some("mistralrs")
}

/// A running server process; killed when dropped.
pub struct Server {
    child: Child,
    /// Kept open: the server exits when it closes (`--exit-with-stdin`).
    stdin: Option<ChildStdin>,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Its data directory (adapter store under `adapters/`).
    pub data_dir: PathBuf,
}

impl Server {
    /// Starts `prefix-rft serve --port 0` with an optional config file text and waits for
    /// `/ready`.
    pub fn start(config: Option<&str>) -> Server {
        Self::start_in(config, &data_dir())
    }

    /// Like [`Server::start`] with its own data directory (adapter store, feedback database).
    pub fn start_in(config: Option<&str>, data_dir: &std::path::Path) -> Server {
        let server = Server::start_listening_in(config, data_dir);
        server.wait_ready();
        server
    }

    /// Starts the server and returns as soon as it listens, while the model may still be
    /// loading (routes that need no model, such as feedback, already answer).
    pub fn start_listening(config: Option<&str>) -> Server {
        Server::start_listening_in(config, &data_dir())
    }

    /// [`Server::start_listening`] with its own data directory.
    pub fn start_listening_in(config: Option<&str>, data_dir: &std::path::Path) -> Server {
        Server::spawn(config, data_dir, false)
    }

    /// [`Server::start_in`] with the `[training] auto` of `config` in force (every other
    /// constructor starts the server with automatic training off).
    pub fn start_auto_training_in(config: &str, data_dir: &std::path::Path) -> Server {
        let server = Server::spawn(Some(config), data_dir, true);
        server.wait_ready();
        server
    }

    /// Starts the default config on generation backend `backend` (`engine` or `mistralrs`),
    /// whatever `PREFIX_RFT_TEST_BACKEND` says, and waits for `/ready`.
    pub fn start_backend_in(backend: &str, data_dir: &std::path::Path) -> Server {
        let server = Server::spawn_on(None, data_dir, false, Some(backend.to_string()));
        server.wait_ready();
        server
    }

    fn spawn(config: Option<&str>, data_dir: &std::path::Path, auto_training: bool) -> Server {
        Server::spawn_on(config, data_dir, auto_training, backend())
    }

    fn spawn_on(
        config: Option<&str>,
        data_dir: &std::path::Path,
        auto_training: bool,
        backend: Option<String>,
    ) -> Server {
        let model = repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            model.is_file(),
            "{} is missing: run scripts/fetch-model (scripts/test does)",
            model.display()
        );
        let mut cmd = Command::new(binary());
        cmd.current_dir(repo_root())
            .args([
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--exit-with-stdin",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        cmd.arg("--data-dir").arg(data_dir);
        if let Some(backend) = backend {
            cmd.arg("--backend").arg(backend);
        }
        // Automatic training would start jobs (new adapter versions, busy cores) under tests
        // that only rate answers; only `Server::start_auto_training_in` keeps it on.
        if !auto_training {
            cmd.arg("--auto-training=false");
        }
        if let Some(text) = config {
            let path = data_dir.with_extension(format!("{}.toml", rand_suffix()));
            std::fs::write(&path, text).expect("write config");
            cmd.arg("--config").arg(path);
        }
        let mut child = cmd.spawn().expect("spawn prefix-rft");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let base = loop {
            let line = lines
                .next()
                .expect("server exited before listening")
                .expect("read stdout");
            if let Some(url) = line.strip_prefix("listening on ") {
                break url.trim().to_string();
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let stdin = child.stdin.take();
        Server {
            child,
            stdin,
            base,
            data_dir: data_dir.to_path_buf(),
        }
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let client = raw_http::status_of_get;
        while Instant::now() < deadline {
            if client(&format!("{}/ready", self.base)) == Some(200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("server at {} not ready after {READY_TIMEOUT:?}", self.base);
    }

    /// `http://127.0.0.1:PORT/v1`.
    pub fn v1(&self) -> String {
        format!("{}/v1", self.base)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process with SIGKILL (no drain, no destructors) and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.flush();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `--data-dir` of every server this test process starts (the default config keeps the
/// feedback database there, as `feedback.sqlite`).
pub fn data_dir() -> PathBuf {
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(sweep_dead_data_dirs);
    std::env::temp_dir().join(format!("prefix-rft-e2e-{}", std::process::id()))
}

/// The shared server lives as long as its test process, so its data directory cannot be
/// removed on drop: each test process removes those of test processes that are gone instead.
fn sweep_dead_data_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("prefix-rft-e2e-") else {
            continue;
        };
        let pid = rest.split('.').next().unwrap_or("");
        if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if std::path::Path::new("/proc").join(pid).exists() {
            continue;
        }
        let path = entry.path();
        let _ = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A minimal blocking GET (status code only) over a raw socket, so the harness needs no async
/// runtime.
mod raw_http {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    pub fn status_of_get(url: &str) -> Option<u16> {
        let rest = url.strip_prefix("http://")?;
        let (host, path) = rest
            .split_once('/')
            .map(|(h, p)| (h, format!("/{p}")))
            .unwrap_or((rest, "/".into()));
        let mut s = TcpStream::connect(host).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        buf.split_whitespace().nth(1)?.parse().ok()
    }
}

/// The server shared by every test of one test binary, started on first use. It exits when
/// the test process does (its stdin closes).
pub fn shared() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| Server::start(None))
}
