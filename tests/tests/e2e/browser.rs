//! Headless Chromium driven over WebDriver (Debian's `chromedriver`, [`fantoccini`]) for the console's
//! tests, and a control plane (`trainyard serve`) in the test process for it to talk to.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use fantoccini::{Client, ClientBuilder, Locator};
use tokio_util::sync::CancellationToken;
use trainyard::{
    api::Tokens,
    config::ControlConfig,
    serve::{serve, ServeSettings},
};

use crate::support::{Env, URL};

/// A control plane serving `env`'s topology from a SQLite store, on `addr` (or a free port).
pub struct ControlPlane {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl ControlPlane {
    pub async fn start(env: &Env, db_url: &str, tokens: &str, addr: Option<SocketAddr>) -> Self {
        Self::start_with(env, db_url, tokens, addr, ControlConfig::default()).await
    }

    /// [`ControlPlane::start`] with schedules and trigger rules.
    pub async fn start_with(env: &Env, db_url: &str, tokens: &str, addr: Option<SocketAddr>, config: ControlConfig) -> Self {
        let settings = ServeSettings {
            amqp_url: URL.into(),
            topology: env.topo.clone(),
            database_url: db_url.into(),
            artifacts: env.artifacts_dir.path().display().to_string(),
            job_types: env.types.clone(),
            tokens: Tokens::parse(tokens).unwrap(),
            config,
            body_limit: 64 * 1024,
            demand_interval: Duration::from_millis(500),
            consumer_timeout: Duration::from_secs(trainyard_common::job::DEFAULT_CONSUMER_TIMEOUT_S),
        };
        let listener = tokio::net::TcpListener::bind(addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap())).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move { serve(settings, listener, stop).await.unwrap() }
        });
        let me = Self { addr, stop, task };
        let ready = async {
            while tokio::net::TcpStream::connect(addr).await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), ready).await.expect("the control plane did not listen");
        me
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// Kills chromedriver (and its browser) when dropped, a failed test included.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A headless Chromium session.
pub struct Browser {
    pub client: Client,
    _driver: Driver,
    _profile: tempfile::TempDir,
}

/// Where the screenshots go: `target/console-screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("console-screenshots")
}

impl Browser {
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("chromedriver").arg(format!("--port={port}")).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect(
            "chromedriver is needed for the console tests: apt-get install chromium chromium-driver (scripts/lib.sh ensure_chromium)",
        );
        let driver = Driver(child);
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--window-size=1280,1000",
        ];
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let caps = serde_json::json!({"goog:chromeOptions": {"args": args}});
        let caps = caps.as_object().unwrap().clone();
        let mut last = None;
        for _ in 0..100 {
            match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(client) => return Self { client, _driver: driver, _profile: profile },
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("could not start a Chromium session through chromedriver: {last:?}");
    }

    /// Runs `script` (a function body) until it returns something truthy; that value.
    pub async fn wait_js(&self, what: &str, secs: u64, script: &str) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.client.execute(script, vec![]).await.unwrap_or(serde_json::Value::Null);
            let truthy = !matches!(&v, serde_json::Value::Null | serde_json::Value::Bool(false)) && v != "" && v != 0;
            if truthy {
                return v;
            }
            if tokio::time::Instant::now() >= deadline {
                let page = self.client.source().await.unwrap_or_default();
                panic!("timed out after {secs} s waiting for {what}; page:\n{page}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The status of a job's row in the Jobs view.
    pub async fn wait_row(&self, job_id: &str, status: &str, secs: u64) {
        let script =
            format!(r#"const r = document.querySelector('tr[data-job-id="{job_id}"]'); return r && r.dataset.status === "{status}";"#);
        self.wait_js(&format!("job {job_id} {status} in the list"), secs, &script).await;
    }

    /// Clicks the element matching `css`, finding it again when the page re-rendered it meanwhile.
    pub async fn click(&self, css: &str) {
        let mut last = None;
        for _ in 0..50 {
            let e = self.client.wait().at_most(Duration::from_secs(20)).for_element(Locator::Css(css)).await;
            let e = e.unwrap_or_else(|e| panic!("no {css}: {e}"));
            match e.click().await {
                Ok(()) => return,
                Err(err) => last = Some(err),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("click {css}: {last:?}");
    }

    pub async fn fill(&self, css: &str, text: &str) {
        let e = self
            .client
            .wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"));
        e.clear().await.unwrap();
        e.send_keys(text).await.unwrap();
    }

    /// Confirms the page's confirmation dialog.
    pub async fn confirm(&self) {
        self.wait_js("the confirmation dialog", 10, "return document.getElementById('confirm').open;").await;
        self.click("#confirm-ok").await;
    }

    /// Saves a screenshot of the page as `target/console-screenshots/<name>.png`.
    pub async fn shot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    /// Is an element matching `css` shown?
    pub async fn shown(&self, css: &str) -> bool {
        let script = format!("const e = document.querySelector({css:?}); return !!e && e.offsetParent !== null;");
        self.client.execute(&script, vec![]).await.unwrap() == serde_json::Value::Bool(true)
    }

    pub async fn quit(self) {
        let _ = self.client.close().await;
    }
}
