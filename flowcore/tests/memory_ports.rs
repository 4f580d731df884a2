//! The conformance kit against the in-memory ports, and what only the memory stores promise.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_stores_pass_the_kit() {
    flowcore::testkit::check(&flowcore::testkit::Backend::memory()).await;
}

#[tokio::test]
async fn the_memory_event_bus_keeps_a_bounded_number_of_runs() {
    use flowcore::ports::EventBus;
    use flowcore::{RunEvent, RunId};
    let bus = flowcore::ports::memory::MemoryEventBus::new(std::time::Duration::from_secs(300), 10);
    let started = |id: &RunId| RunEvent::RunStarted { run_id: id.clone() };
    let ids: Vec<RunId> = (0..25).map(|_| RunId::new()).collect();
    // The first run keeps publishing: it is spared while newer runs push the cap.
    for id in &ids {
        bus.publish(&started(id)).await.unwrap();
        bus.publish(&started(&ids[0])).await.unwrap();
    }
    let wait = std::time::Duration::ZERO;
    let kept: Vec<bool> = {
        let mut kept = Vec::new();
        for id in &ids {
            kept.push(!bus.read(id, None, wait).await.unwrap().is_empty());
        }
        kept
    };
    assert_eq!(kept.iter().filter(|k| **k).count(), 10, "{kept:?}");
    assert!(kept[0], "the active run is kept");
    assert!(
        kept[24] && !kept[1],
        "the newest are kept, the oldest dropped"
    );
}

#[tokio::test]
async fn the_memory_event_bus_drops_ended_runs_before_running_ones() {
    use flowcore::ports::EventBus;
    use flowcore::{RunEvent, RunId, RunStatus};
    let bus = flowcore::ports::memory::MemoryEventBus::new(std::time::Duration::from_secs(300), 3);
    let ids: Vec<RunId> = (0..4).map(|_| RunId::new()).collect();
    let ended = &ids[0];
    for id in &ids {
        bus.publish(&RunEvent::RunStarted { run_id: id.clone() })
            .await
            .unwrap();
        if id == ended {
            bus.publish(&RunEvent::RunFinished {
                run_id: id.clone(),
                status: RunStatus::Succeeded,
                error: None,
            })
            .await
            .unwrap();
        }
    }
    let wait = std::time::Duration::ZERO;
    assert!(
        bus.read(ended, None, wait).await.unwrap().is_empty(),
        "the oldest run had ended: dropped"
    );
    for id in &ids[1..] {
        assert!(
            !bus.read(id, None, wait).await.unwrap().is_empty(),
            "runs still running are kept"
        );
    }
}
