//! The export service in cluster mode: standby and the start of a term.

use super::*;
use crate::api::{ApiState, TokenSet};
use crate::metrics::Metrics;

/// Cluster mode: a node starting in standby leaves a job the holder runs IN_PROGRESS; the
/// next holder, when its term begins, marks it FAILED (durably) like a restart on one node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_leaves_running_jobs_alone_and_the_next_holder_fails_them() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let store = Store::open_in_memory(metrics.clone()).unwrap();
    let registry = Registry::open(store.clone(), metrics.clone()).unwrap();
    let firmware =
        FirmwareRepo::open(dir.path(), store.clone(), "http://gw.test".into(), 1 << 20).unwrap();
    let state = ApiState::for_tests(
        dir.path(),
        store.clone(),
        registry.clone(),
        metrics,
        TokenSet::new(Vec::<(String, crate::api::Role)>::new()),
        firmware.clone(),
    );
    let running = JobRecord {
        id: "exp-running".into(),
        kind: JobKind::Export,
        name: "nightly".into(),
        created_at_ms: 1,
        updated_at_ms: 1,
        started_at_ms: Some(1),
        ended_at_ms: None,
        status: Status::new(JobState::InProgress, "In Progress"),
        objects: Vec::new(),
        log: Vec::new(),
        package_size: None,
        secrets_included: false,
        conflict_policy: None,
        started_by: None,
    };
    store.submit(vec![doc_op(&running)]).await.unwrap();
    let open = |start| {
        ExportService::open(
            dir.path(),
            store.clone(),
            registry.clone(),
            firmware.clone(),
            state.ota.clone(),
            state.migration.clone(),
            ExportSettings::default(),
            Arc::new(|_: &str, _: &str| {}),
            start,
        )
        .unwrap()
    };
    let standby = tokio::task::block_in_place(|| open(Start::Standby));
    let job = standby.get(JobKind::Export, "exp-running").unwrap();
    assert_eq!(job.status.state, JobState::InProgress);
    // A node that starts after the standby still finds it running.
    let later = tokio::task::block_in_place(|| open(Start::Standby));
    assert_eq!(
        later
            .get(JobKind::Export, "exp-running")
            .unwrap()
            .status
            .state,
        JobState::InProgress
    );

    standby.activate().await.unwrap();
    let job = standby.get(JobKind::Export, "exp-running").unwrap();
    assert_eq!(job.status.state, JobState::Failed);
    assert!(job.log.iter().any(|l| l.code == "FGX_009"), "{:?}", job.log);
    // Durable: any node loading now sees it FAILED.
    let again = tokio::task::block_in_place(|| open(Start::Standby));
    assert_eq!(
        again
            .get(JobKind::Export, "exp-running")
            .unwrap()
            .status
            .state,
        JobState::Failed
    );
}
