//! The artifact store on an S3-compatible bucket, against a local moto server
//! (`scripts/test.sh` installs it under `target/moto`; `TRAINYARD_TEST_MOTO` names
//! another `moto_server`).

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use trainyard_common::artifacts::{keys, ArtifactStore, JobRecords};

/// A moto S3 server on a free local port, stopped on drop.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start() -> Self {
        let bin = std::env::var_os("TRAINYARD_TEST_MOTO")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/moto/bin/moto_server"));
        assert!(
            bin.is_file(),
            "{} not found: this test needs a moto S3 server (scripts/test.sh installs it; or \
             python3 -m venv target/moto && target/moto/bin/pip install 'moto[server]')",
            bin.display()
        );
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let moto = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not listen on port {port} within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket (moto takes unsigned requests).
    fn create_bucket(&self, bucket: &str) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(s, "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", self.port).unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "create bucket {bucket}: {reply}");
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `AWS_*` settings of a store at `endpoint` over plain HTTP.
fn settings(endpoint: String) -> Vec<(String, String)> {
    [
        ("AWS_ENDPOINT", endpoint),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        // As in k8s/base/config.yaml for AWS itself: empty means not set.
        ("AWS_SESSION_TOKEN", String::new()),
    ]
    .map(|(k, v)| (k.to_string(), v))
    .into()
}

fn open(moto: &Moto, location: &str) -> ArtifactStore {
    ArtifactStore::open_with(location, settings(moto.endpoint())).unwrap()
}

#[tokio::test]
async fn artifacts_round_trip_on_an_s3_bucket_under_a_prefix() {
    let moto = Moto::start();
    moto.create_bucket("trainyard-test");
    let store = open(&moto, "s3://trainyard-test/prod");
    let job = "0193aaaa-0000-7000-8000-0000000000f1";

    assert!(!store.may_hold(&keys::job(job)).await.unwrap());
    assert_eq!(store.job_records(job).await.unwrap(), JobRecords { outcome: None, cancel_marker: false });
    store.put(&format!("{}/metrics.json", keys::job(job)), "{\"accuracy\": 0.9}").await.unwrap();
    store.put(&keys::attempt_log(job, 1), "line\n").await.unwrap();
    assert!(store.may_hold(&keys::job(job)).await.unwrap());
    assert_eq!(store.list(&keys::job(job)).await.unwrap(), [format!("jobs/{job}/logs/attempt-1.log"), format!("jobs/{job}/metrics.json")]);
    let metrics: serde_json::Value = store.get_json(&format!("{}/metrics.json", keys::job(job))).await.unwrap().unwrap();
    assert_eq!(metrics["accuracy"], 0.9);

    // Created once: a second create of the outcome record is refused and changes nothing.
    assert!(store.put_if_absent(&keys::outcome(job), "{\"first\": true}").await.unwrap());
    assert!(!store.put_if_absent(&keys::outcome(job), "{\"first\": false}").await.unwrap());
    assert_eq!(store.job_records(job).await.unwrap().outcome, Some(keys::outcome(job)));
    assert_eq!(store.get(&keys::outcome(job)).await.unwrap().unwrap(), "{\"first\": true}");

    // Everything is under the prefix in the bucket.
    let bucket = open(&moto, "s3://trainyard-test");
    assert!(bucket.exists(&format!("prod/{}", keys::outcome(job))).await.unwrap());
    assert!(!bucket.exists(&keys::outcome(job)).await.unwrap());

    store.delete(&keys::attempt_log(job, 1)).await.unwrap();
    store.delete(&keys::attempt_log(job, 1)).await.unwrap();
    assert!(!store.exists(&keys::attempt_log(job, 1)).await.unwrap());

    // The start-up probe passes on a store that keeps create-once writes, and leaves nothing.
    store.check_create_once().await.unwrap();
    assert!(store.list("probes").await.unwrap().is_empty());
}

#[tokio::test]
async fn an_unreachable_s3_store_is_a_clear_error_not_a_hang() {
    // Nothing listens on the port: the first call fails with the key it was for.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let store = ArtifactStore::open_with("s3://nowhere", settings(format!("http://127.0.0.1:{port}"))).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(30), store.put("jobs/x/a.txt", "a")).await.expect("fails in time").unwrap_err();
    assert!(err.to_string().contains("jobs/x/a.txt"), "{err}");
    // A store down at start-up does not keep a worker or the control plane from starting (their
    // store operations wait for it job by job): the create-once probe only logs it.
    tokio::time::timeout(Duration::from_secs(60), trainyard_common::artifacts::refuse_unfit(&store))
        .await
        .expect("gives up in time")
        .expect("an unreachable store is not refused");
}
