//! Tests of the Kubernetes integration against a mock API server, the way kube-rs tests
//! itself: `tower_test::mock::pair` gives a `kube::Client` and a handle that sees every request.

use super::*;
use http::{header::CONTENT_TYPE, Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{json, Value};
use tower_test::mock::{self, Handle, SendResponse};

type ApiHandle = Handle<Request<Body>, Response<Body>>;

const NS: &str = "trainyard";
const POD: &str = "worker-intent-train-7d9f-abcde";

fn mock_client() -> (Client, ApiHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

fn spawn_reporter(client: Client) -> (watch::Sender<usize>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(0usize);
    (tx, tokio::spawn(PodCostReporter::new(client, NS, POD, PodCostConfig::default()).run(rx)))
}

fn reply(send: SendResponse<Response<Body>>, status: StatusCode, body: Value) {
    let mut response = Response::new(Body::from(serde_json::to_vec(&body).unwrap()));
    *response.status_mut() = status;
    send.send_response(response);
}

fn status_body(status: StatusCode) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": "injected by the test", "reason": "InternalError", "code": status.as_u16()})
}

/// Takes the next request, asserts it is exactly the merge patch of `cost` on our pod, and returns its responder.
async fn next_patch(handle: &mut ApiHandle, cost: i32) -> SendResponse<Response<Body>> {
    let (request, send) = handle.next_request().await.expect("the reporter sent no request");
    assert_eq!(request.method(), Method::PATCH);
    assert_eq!(request.uri().path(), format!("/api/v1/namespaces/{NS}/pods/{POD}"));
    // kube writes `?&fieldManager=…`; the API server (like any form decoder) skips the empty pair.
    let query: Vec<&str> = request.uri().query().unwrap_or("").split('&').filter(|p| !p.is_empty()).collect();
    assert_eq!(query, ["fieldManager=trainyard-worker"]);
    assert_eq!(request.headers()[CONTENT_TYPE], "application/merge-patch+json");
    let body: Value = serde_json::from_slice(&request.into_body().collect_bytes().await.unwrap()).unwrap();
    assert_eq!(body, json!({"metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": cost.to_string()}}}));
    send
}

/// Expects the merge patch of `cost` and answers it like the API server: 200 with the pod, or an error status.
async fn expect_patch(handle: &mut ApiHandle, cost: i32, status: StatusCode) {
    let send = next_patch(handle, cost).await;
    if status.is_success() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": POD, "namespace": NS, "annotations": {POD_DELETION_COST: cost.to_string()}}});
        reply(send, status, pod);
    } else {
        reply(send, status, status_body(status));
    }
}

/// After the sender is gone the task ends and nothing more is sent.
async fn expect_end(tx: watch::Sender<usize>, task: JoinHandle<()>, mut handle: ApiHandle) {
    drop(tx);
    task.await.unwrap();
    assert!(handle.next_request().await.is_none(), "unexpected request after the end");
}

#[tokio::test(start_paused = true)]
async fn patches_only_when_busy_or_idle_changes() {
    let (client, mut h) = mock_client();
    let (tx, task) = spawn_reporter(client);
    expect_patch(&mut h, 0, StatusCode::OK).await; // the state at start

    tx.send_replace(1);
    let busy_at = Instant::now();
    expect_patch(&mut h, 10_000, StatusCode::OK).await;
    assert_eq!(busy_at.elapsed(), Duration::ZERO, "busy is reported at once");

    tx.send_replace(2); // still busy: no patch
    tokio::time::sleep(Duration::from_secs(60)).await;
    tx.send_replace(1);
    tokio::time::sleep(Duration::from_secs(60)).await;

    tx.send_replace(0);
    let idle_at = Instant::now();
    expect_patch(&mut h, 0, StatusCode::OK).await;
    assert_eq!(idle_at.elapsed(), PodCostConfig::default().idle_delay, "idle is reported after the idle delay");
    expect_end(tx, task, h).await;
}

#[tokio::test(start_paused = true)]
async fn back_to_back_jobs_cost_no_idle_patch() {
    let (client, mut h) = mock_client();
    let (tx, task) = spawn_reporter(client);
    expect_patch(&mut h, 0, StatusCode::OK).await;
    tx.send_replace(1);
    expect_patch(&mut h, 10_000, StatusCode::OK).await;

    tx.send_replace(0); // a job ends and the next one starts 2 s later
    tokio::time::sleep(Duration::from_secs(2)).await;
    tx.send_replace(1);
    tokio::time::sleep(Duration::from_secs(600)).await;

    tx.send_replace(0);
    let idle_at = Instant::now();
    expect_patch(&mut h, 0, StatusCode::OK).await; // the next request is the final idle: nothing in between
    assert_eq!(idle_at.elapsed(), Duration::from_secs(5));
    expect_end(tx, task, h).await;
}

#[tokio::test(start_paused = true)]
async fn api_errors_are_retried_on_the_next_change_and_after_a_while() {
    let (client, mut h) = mock_client();
    let (tx, task) = spawn_reporter(client);
    expect_patch(&mut h, 0, StatusCode::INTERNAL_SERVER_ERROR).await;

    // The next change is patched at once, whatever failed before.
    tx.send_replace(1);
    expect_patch(&mut h, 10_000, StatusCode::FORBIDDEN).await;

    // No change: the failed patch is retried after `retry_after`.
    let failed_at = Instant::now();
    expect_patch(&mut h, 10_000, StatusCode::OK).await;
    assert_eq!(failed_at.elapsed(), PodCostConfig::default().retry_after);

    // And the reporter goes on as before.
    tx.send_replace(0);
    expect_patch(&mut h, 0, StatusCode::OK).await;
    expect_end(tx, task, h).await;
}

#[tokio::test(start_paused = true)]
async fn a_hung_api_server_never_blocks_the_runtime() {
    let (client, mut h) = mock_client();
    let (tx, task) = spawn_reporter(client);
    let _unanswered = next_patch(&mut h, 0).await;

    // The runtime's side never waits on the API: jobs start and end while the patch hangs.
    let before = Instant::now();
    for n in [1, 2, 1, 0, 1] {
        tx.send_replace(n);
    }
    assert_eq!(before.elapsed(), Duration::ZERO);

    // The hung call times out, and the change that came meanwhile is patched right after.
    expect_patch(&mut h, 10_000, StatusCode::OK).await;
    assert_eq!(before.elapsed(), API_TIMEOUT);
    expect_end(tx, task, h).await;
}

#[tokio::test]
async fn worker_attributes_read_the_gpu_model_from_node_labels() {
    let (client, mut h) = mock_client();
    let server = tokio::spawn(async move {
        let (request, send) = h.next_request().await.expect("no request");
        assert_eq!(request.method(), Method::GET);
        assert_eq!(request.uri().path(), "/api/v1/nodes/gpu-node-1");
        let labels = json!({"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB", "nvidia.com/gpu.count": "8",
                            "nvidia.com/gpu.present": "true", "topology.kubernetes.io/zone": "eu-west-1a",
                            "kubernetes.io/hostname": "gpu-node-1"});
        reply(send, StatusCode::OK, json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "gpu-node-1", "labels": labels}}));
    });
    let attrs = worker_attributes(client, "gpu-node-1").await;
    server.await.unwrap();
    let expected: BTreeMap<String, String> =
        [("node", "gpu-node-1"), ("gpu", "NVIDIA-A100-SXM4-40GB"), ("gpu_count", "8"), ("zone", "eu-west-1a")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    assert_eq!(attrs, expected);
}

#[tokio::test]
async fn worker_attributes_fall_back_to_the_node_name_on_errors() {
    let (client, mut h) = mock_client();
    let server = tokio::spawn(async move {
        let (_, send) = h.next_request().await.expect("no request");
        reply(send, StatusCode::FORBIDDEN, status_body(StatusCode::FORBIDDEN));
    });
    let attrs = worker_attributes(client, "cpu-node-3").await;
    server.await.unwrap();
    assert_eq!(attrs, BTreeMap::from([("node".to_string(), "cpu-node-3".to_string())]));
}

/// A server error reading the Node (the API server restarting as the pod starts) is tried
/// again: the attributes are read once, and the worker reported no `gpu` for its whole life.
#[tokio::test]
async fn worker_attributes_try_again_after_a_server_error() {
    let (client, mut h) = mock_client();
    let server = tokio::spawn(async move {
        let (_, send) = h.next_request().await.expect("no request");
        reply(send, StatusCode::SERVICE_UNAVAILABLE, status_body(StatusCode::SERVICE_UNAVAILABLE));
        let (request, send) = h.next_request().await.expect("no second request");
        assert_eq!(request.uri().path(), "/api/v1/nodes/gpu-node-2");
        let labels = json!({"nvidia.com/gpu.product": "NVIDIA-H200"});
        reply(send, StatusCode::OK, json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "gpu-node-2", "labels": labels}}));
    });
    let attrs = worker_attributes(client, "gpu-node-2").await;
    server.await.unwrap();
    assert_eq!(attrs.get("gpu").map(String::as_str), Some("NVIDIA-H200"), "{attrs:?}");
}

#[test]
fn gpu_model_falls_back_to_cloud_labels() {
    let labels = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>();
    let gke = node_label_attributes(&labels(&[("cloud.google.com/gke-accelerator", "nvidia-l4")]));
    assert_eq!(gke.get("gpu").map(String::as_str), Some("nvidia-l4"));
    let both =
        node_label_attributes(&labels(&[("k8s.amazonaws.com/accelerator", "nvidia-tesla-t4"), ("nvidia.com/gpu.product", "Tesla-T4")]));
    assert_eq!(both.get("gpu").map(String::as_str), Some("Tesla-T4"));
    let cpu = node_label_attributes(&labels(&[("node.kubernetes.io/instance-type", "m7i.2xlarge"), ("nvidia.com/gpu.product", "")]));
    assert_eq!(cpu, labels(&[("instance_type", "m7i.2xlarge")]));
}

#[test]
fn identity_and_costs_come_from_the_environment() {
    let env =
        |pairs: &'static [(&'static str, &'static str)]| move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
    assert_eq!(PodIdentity::from_lookup(env(&[])), None);
    assert_eq!(PodIdentity::from_lookup(env(&[("POD_NAME", "w-1"), ("POD_NAMESPACE", " ")])), None);
    assert_eq!(
        PodIdentity::from_lookup(env(&[("POD_NAME", "w-1"), ("POD_NAMESPACE", "trainyard"), ("NODE_NAME", "n1")])),
        Some(PodIdentity { name: "w-1".into(), namespace: "trainyard".into(), node: Some("n1".into()) })
    );
    assert_eq!(PodCostConfig::from_lookup(env(&[])), PodCostConfig::default());
    let custom = PodCostConfig::from_lookup(env(&[(ENV_BUSY_COST, "500"), (ENV_IDLE_COST, "-100")]));
    assert_eq!((custom.busy_cost, custom.idle_cost), (500, -100));
    let invalid = PodCostConfig::from_lookup(env(&[(ENV_BUSY_COST, "lots"), (ENV_IDLE_COST, "99999999999")]));
    assert_eq!(invalid, PodCostConfig::default());
}
