//! Security: `amqps://` through a TLS-terminating proxy (the local broker has no
//! TLS listener), credentials never in any log line or error message, and
//! dataset/artifact paths confined to their root.

use std::{
    path::Path,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use trainyard_common::{artifacts::ArtifactStore, paths::resolve_under};

use crate::support::{bin, Env, Killed};

/// A self-signed certificate for 127.0.0.1 / localhost: (PEM of the cert, server TLS config).
fn self_signed() -> (String, Arc<rustls::ServerConfig>) {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(cert.der().to_vec())], key)
        .unwrap();
    (cert.pem(), Arc::new(cfg))
}

/// A TLS-terminating proxy in front of the local broker: TLS on a free port,
/// plain AMQP to 127.0.0.1:5672. Returns the port and the number of completed handshakes.
async fn tls_proxy(cfg: Arc<rustls::ServerConfig>) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let handshakes = Arc::new(AtomicUsize::new(0));
    let count = handshakes.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, count) = (acceptor.clone(), count.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                count.fetch_add(1, Ordering::SeqCst);
                let Ok(mut broker) = TcpStream::connect("127.0.0.1:5672").await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
            });
        }
    });
    (port, handshakes)
}

/// Runs `trainyard` with `args` and `envs` on a blocking thread: (exit ok, stdout, stderr).
async fn trainyard(args: &[&str], envs: Vec<(&'static str, String)>) -> (bool, String, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(bin("trainyard")).args(&args).envs(envs).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    })
    .await
    .unwrap()
}

/// A `trainyard-worker run` process with its stdout and stderr in `log`.
fn worker(env: &Env, url: &str, log: &Path, extra_env: &[(&str, &str)]) -> Killed {
    let file = std::fs::File::create(log).unwrap();
    Killed(
        Command::new(bin("trainyard-worker"))
            .args(["run", "--types", "noop", "--log-format", "json"])
            .env("TRAINYARD_PREFIX", env.topo.prefix())
            .env("TRAINYARD_ARTIFACTS", env.artifacts_dir.path())
            .env("TRAINYARD_AMQP_URL", url)
            .env("TRAINYARD_CONSUMER_TIMEOUT_S", crate::support::CONSUMER_TIMEOUT_S.to_string())
            .envs(extra_env.iter().copied())
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap(),
    )
}

/// `amqps://` works end to end: a worker and `trainyard submit --wait` both talk
/// TLS (rustls, certificate verified against the CA in `SSL_CERT_FILE`) to a proxy
/// in front of the broker; without that CA the connection is refused.
#[tokio::test]
async fn amqps_through_a_tls_terminating_proxy() {
    let env = Env::new(&["noop"]).await;
    let (ca_pem, server) = self_signed();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &ca_pem).unwrap();
    let (port, handshakes) = tls_proxy(server).await;
    let url = format!("amqps://guest:guest@127.0.0.1:{port}/%2f");
    let ca_env = ca.to_str().unwrap().to_string();
    let w = worker(&env, &url, &dir.path().join("worker.log"), &[("SSL_CERT_FILE", &ca_env)]);
    let envs = |with_ca: bool| {
        let mut v = vec![("TRAINYARD_PREFIX", env.topo.prefix().to_string()), ("TRAINYARD_AMQP_URL", url.clone())];
        v.push(("SSL_CERT_FILE", if with_ca { ca_env.clone() } else { "/dev/null".into() }));
        v
    };
    let (ok, stdout, stderr) =
        trainyard(&["submit", "noop", "--bot", "tls", "--param", "sleep_ms=10", "--wait", "--json", "--wait-timeout", "60"], envs(true))
            .await;
    assert!(ok, "submit over amqps failed: {stdout} {stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["status"], "succeeded");
    assert!(handshakes.load(Ordering::SeqCst) >= 2, "the worker and the CLI both connected through TLS");

    // An untrusted certificate is refused: verification is on.
    let (ok, _, stderr) = trainyard(&["submit", "noop", "--bot", "tls"], envs(false)).await;
    assert!(!ok, "a server certificate from an unknown CA must be refused");
    assert!(stderr.to_lowercase().contains("certificate") || stderr.to_lowercase().contains("issuer"), "{stderr}");
    tokio::task::spawn_blocking(move || drop(w)).await.unwrap();
    env.cleanup().await;
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Passwords in broker URLs never reach a log line or an error message: a worker
/// and the CLI run against an unreachable port, a wrong password and a good URL
/// (a broker user made for this test), with debug logging, and their whole
/// output and the job logs are searched for the password.
#[tokio::test]
async fn broker_passwords_are_redacted_in_every_log_line_and_error() {
    let env = Env::new(&["noop"]).await;
    let user = format!("trainyard-redact-{}", &env.topo.prefix()[2..14]);
    let secret = format!("Pw{}Xy", uuid::Uuid::new_v4().simple());
    let user2 = user.clone();
    let secret2 = secret.clone();
    tokio::task::spawn_blocking(move || {
        rabbitmqctl(&["add_user", &user2, &secret2]);
        rabbitmqctl(&["set_permissions", "-p", "/", &user2, ".*", ".*", ".*"]);
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let urls = [
        ("refused", format!("amqp://{user}:{secret}@127.0.0.1:1/%2f")),
        ("no-such-host", format!("amqp://{user}:{secret}@no-such-host.invalid:5672/%2f")),
        ("wrong-password", format!("amqp://{user}:{secret}x@127.0.0.1:5672/%2f")),
        ("bad-url", format!("amqp://{user}:{secret}@127.0.0.1:notaport/%2f")),
        ("good", format!("amqp://{user}:{secret}@127.0.0.1:5672/%2f")),
    ];
    let mut outputs = Vec::new();
    let debug = [("RUST_LOG", "debug")];
    for (name, url) in &urls {
        let log = dir.path().join(format!("worker-{name}.log"));
        let w = worker(&env, url, &log, &debug);
        let envs =
            || vec![("TRAINYARD_PREFIX", env.topo.prefix().to_string()), ("TRAINYARD_AMQP_URL", url.clone()), ("RUST_LOG", "debug".into())];
        let wait = if *name == "good" { "60" } else { "5" };
        let (ok, stdout, stderr) =
            trainyard(&["submit", "noop", "--bot", "redact", "--param", "sleep_ms=10", "--wait", "--json", "--wait-timeout", wait], envs())
                .await;
        assert_eq!(ok, *name == "good", "{name}: {stdout} {stderr}");
        if *name != "good" {
            // The error names the broker, with the password replaced.
            assert!(stderr.contains("***") || stdout.contains("***") || *name == "bad-url", "{name}: {stderr}");
        }
        // Flags too: the URL given on the command line.
        let (_, out2, err2) = trainyard(&["--amqp-url", url, "submit", "noop", "--bot", "redact"], envs()).await;
        tokio::time::sleep(Duration::from_secs(if *name == "good" { 0 } else { 2 })).await;
        tokio::task::spawn_blocking(move || drop(w)).await.unwrap();
        let worker_log = std::fs::read_to_string(&log).unwrap();
        outputs.push((format!("{name}: submit"), format!("{stdout}\n{stderr}\n{out2}\n{err2}")));
        outputs.push((format!("{name}: worker"), worker_log));
    }
    // The job logs in the artifact store.
    for entry in walk(env.artifacts_dir.path()) {
        outputs.push((entry.display().to_string(), std::fs::read_to_string(&entry).unwrap_or_default()));
    }
    let user2 = user.clone();
    tokio::task::spawn_blocking(move || rabbitmqctl(&["delete_user", &user2])).await.unwrap();
    assert!(outputs.iter().any(|(n, o)| n == "good: worker" && o.contains("job succeeded")), "the good worker ran the job");
    assert!(outputs.iter().any(|(n, o)| n.starts_with("refused") && o.contains("***")), "errors name the redacted URL");
    for (name, text) in &outputs {
        assert!(!text.contains(&secret), "the password appears in {name}:\n{}", &text[..text.len().min(4000)]);
    }
    env.cleanup().await;
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Dataset paths: traversal, absolute paths, `file:` URIs and symlinks out of
/// the data root are refused — also through a symlink to a file that does not
/// exist yet, and a dangling symlink (a write there would land outside).
#[test]
fn dataset_paths_stay_under_the_data_root() {
    let outside = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("clinc150")).unwrap();
    std::fs::write(root.join("clinc150/data.json"), "{}").unwrap();
    std::fs::write(outside.path().join("secret.json"), "{}").unwrap();
    std::os::unix::fs::symlink(outside.path(), root.join("out")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret.json"), root.join("secret.json")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("later.json"), root.join("dangling.json")).unwrap();
    std::os::unix::fs::symlink("clinc150", root.join("inside")).unwrap();
    for ok in ["clinc150/data.json", "./clinc150/data.json", "file:clinc150/data.json", "inside/data.json", "clinc150/new.json"] {
        let p = resolve_under(root, ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        assert!(p.starts_with(root), "{ok} -> {}", p.display());
    }
    let secret = outside.path().join("secret.json");
    for bad in [
        "../secret.json",
        "clinc150/../../secret.json",
        "/etc/passwd",
        secret.to_str().unwrap(),
        "file:///etc/passwd",
        "C:\\Windows\\win.ini",
        "\\\\server\\share",
        "out/secret.json",
        "secret.json",
        "out",
        "out/new-file.json",
        "dangling.json",
        "",
    ] {
        assert!(resolve_under(root, bad).is_err(), "{bad:?} must be refused");
    }
}

/// Artifact keys cannot leave the artifact root: `..`, absolute keys and
/// empty segments are kept inside it by the store's key encoding.
#[tokio::test]
async fn artifact_keys_stay_under_the_artifact_root() {
    let parent = tempfile::tempdir().unwrap();
    let root = parent.path().join("artifacts");
    let store = ArtifactStore::open(root.to_str().unwrap()).unwrap();
    for key in ["../escaped.txt", "/escaped-abs.txt", "jobs/../../escaped2.txt", "jobs//x/./y.txt", "a/%2e%2e/b.txt"] {
        store.put(key, "x").await.unwrap();
    }
    let outside: Vec<_> = std::fs::read_dir(parent.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(outside, vec![std::ffi::OsString::from("artifacts")], "nothing written next to the root");
    assert!(!Path::new("/escaped-abs.txt").exists());
    assert!(walk(&root).iter().all(|p| p.starts_with(&root)));
    assert_eq!(walk(&root).len(), 5);
}
