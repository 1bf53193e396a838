//! Dead letters: each listed, and each real job's final event recorded or parked, never lost.

use lapin::{
    options::{BasicGetOptions, BasicNackOptions},
    types::{AMQPValue, FieldArray, FieldTable},
    BasicProperties,
};
use trainyard_common::{codec, event::DEAD_LETTER_SEQ, headers, JobEvent, JobStatus};

use crate::helpers::*;

#[tokio::test]
async fn dead_letters_become_dead_jobs_with_reason() {
    let (store, _dir, _) = sqlite_store().await;
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_job_type(&ch, "noop").await.unwrap();
    let recorder = spawn_recorder(&store, &topo);

    // 1. A worker's dead letter: permanent error, with reason headers.
    let permanent = spec("noop", "bot-a");
    let mut h = FieldTable::default();
    headers::set_str(&mut h, headers::DEAD_REASON, "unknown param `colour`");
    headers::set_str(&mut h, headers::DEAD_KIND, "permanent");
    headers::set_str(&mut h, headers::JOB_ID, permanent.job_id.clone());
    headers::set_int(&mut h, headers::ATTEMPT, 1);
    let props = BasicProperties::default().with_content_type(codec::MSGPACK.into()).with_headers(h);
    publish_raw(&ch, &topo.dead_exchange(), "noop", &msgpack(&permanent), props).await;

    // 2. A letter with only `x-death`, as the broker writes at the delivery limit.
    let crashed = spec("noop", "bot-b");
    let mut death = FieldTable::default();
    death.insert("reason".into(), AMQPValue::LongString("delivery_limit".into()));
    death.insert("queue".into(), AMQPValue::LongString(topo.jobs_queue("noop").into()));
    let mut h = FieldTable::default();
    h.insert(headers::X_DEATH.into(), AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])));
    let props = BasicProperties::default().with_content_type(codec::MSGPACK.into()).with_headers(h);
    publish_raw(&ch, &topo.dead_exchange(), "noop", &msgpack(&crashed), props).await;

    // 3. The real thing: the broker dead-letters a job returned 21 times (delivery limit 20).
    let looping = spec("noop", "bot-c");
    let props = BasicProperties::default().with_content_type(codec::MSGPACK.into()).with_message_id(looping.job_id.as_str().into());
    publish_raw(&ch, &topo.jobs_exchange(), "noop", &msgpack(&looping), props).await;
    let mut returns = 0;
    while returns <= trainyard_common::topology::DELIVERY_LIMIT {
        if let Some(msg) = ch.basic_get(topo.jobs_queue("noop").into(), BasicGetOptions::default()).await.unwrap() {
            msg.delivery.acker.nack(BasicNackOptions { requeue: true, multiple: false }).await.unwrap();
            returns += 1;
        } else {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    // 4. A job whose publisher's TTL ran out in its queue: the broker dead-letters it as
    //    expired, which is not a crash loop.
    let expiring = spec("noop", "bot-e");
    let props = BasicProperties::default().with_content_type(codec::MSGPACK.into()).with_expiration("50".into());
    publish_raw(&ch, &topo.jobs_exchange(), "noop", &msgpack(&expiring), props).await;

    // 5. Garbage: recorded as a poison dead letter, no job.
    let mut h = FieldTable::default();
    headers::set_str(&mut h, headers::DEAD_REASON, "undecodable: not msgpack");
    headers::set_str(&mut h, headers::DEAD_KIND, "poison");
    publish_raw(&ch, &topo.dead_exchange(), "noop", b"\xc1\xc1 garbage", BasicProperties::default().with_headers(h)).await;

    for (job, reason) in [
        (&permanent, "unknown param `colour`"),
        (&crashed, trainyard::recorder::DELIVERY_LIMIT_REASON),
        (&looping, trainyard::recorder::DELIVERY_LIMIT_REASON),
        (&expiring, "expired in its queue before a worker took it (the message's `expiration`)"),
    ] {
        let row =
            eventually(30, "a dead job", || async { store.job(&job.job_id).await.unwrap().filter(|j| j.status == JobStatus::Dead) }).await;
        assert_eq!(row.error.as_ref().map(|e| e.message.as_str()), Some(reason), "{}", job.bot);
        let events = store.events(&job.job_id).await.unwrap();
        assert_eq!(events.last().unwrap().seq, DEAD_LETTER_SEQ);
    }
    let letters = eventually(10, "5 dead letters", || async {
        let l = store.dead_letters(Some("noop")).await.unwrap();
        (l.len() == 5).then_some(l)
    })
    .await;
    assert_eq!(letters.iter().filter(|l| l.broker_dead_lettered).count(), 3);
    let kinds: Vec<_> = letters.iter().filter(|l| l.broker_dead_lettered).map(|l| l.kind.as_str()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "expired").count(), 1, "{kinds:?}");
    let poison = letters.iter().find(|l| l.job_id.is_none()).unwrap();
    assert_eq!(poison.kind, "poison");
    assert!(poison.id.starts_with("poison-"));
    recorder.stop().await;
    cleanup(&topo, &["noop"]).await;
}

/// A dead letter the store cannot take for a reason a retry can fix (here its table is
/// away) goes back to the recorder's dead-letter queue instead of being acked and lost:
/// once the store is back it is recorded, once.
#[tokio::test]
async fn a_dead_letter_the_store_cannot_take_yet_is_returned_and_recorded_later() {
    let (store, _dir, _) = sqlite_store().await;
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_job_type(&ch, "noop").await.unwrap();
    store.execute_raw("ALTER TABLE dead_letters RENAME TO dead_letters_away").await.unwrap();
    let recorder = spawn_recorder(&store, &topo);
    let job = spec("noop", "bot-dead");
    publish_raw(&ch, &topo.dead_exchange(), "noop", &msgpack(&job), worker_dead_letter(&job)).await;
    // The recorder tries (and fails) a few times meanwhile.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    store.execute_raw("ALTER TABLE dead_letters_away RENAME TO dead_letters").await.unwrap();
    let letters = eventually(20, "the dead letter recorded after the store recovered", || async {
        let l = store.dead_letters(Some("noop")).await.unwrap();
        (!l.is_empty()).then_some(l)
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let letters_now = store.dead_letters(Some("noop")).await.unwrap();
    assert_eq!(letters_now.len(), 1, "{letters:?}");
    assert_eq!(letters_now[0].job_id.as_deref(), Some(job.job_id.as_str()));
    assert_eq!(letters_now[0].reason, "unknown param `colour`");
    let job_row = store.job(&job.job_id).await.unwrap().expect("a dead job");
    assert_eq!(job_row.status, JobStatus::Dead);
    recorder.stop().await;
    cleanup(&topo, &["noop"]).await;
}

/// A dead letter whose final event the store refuses for what it is (here a trigger refuses
/// every `dead` event) is recorded and acked, and its final event, often the job's only one (a
/// crash loop the broker dead-lettered), is parked where `events parked` shows it: it used to
/// be dropped, the job left `started` for ever.
#[tokio::test]
async fn a_dead_letters_final_event_the_store_refuses_is_parked_not_dropped() {
    let (store, _dir, _) = sqlite_store().await;
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_job_type(&ch, "noop").await.unwrap();
    let job = spec("noop", "bot-refused");
    store.execute_raw(&refusing_inserts("refuse_dead", "job_events", "NEW.status = 'dead'", "no dead events here")).await.unwrap();
    let recorder = spawn_recorder(&store, &topo);
    publish_raw(&ch, &topo.dead_exchange(), "noop", &msgpack(&job), worker_dead_letter(&job)).await;
    let parked = eventually(20, "the final event parked", || async {
        let p = store.parked_events().await.unwrap();
        p.iter().any(|p| p.reason.contains("final event of a dead letter")).then_some(p)
    })
    .await;
    // Its copy on the stream is refused and parked too (as the same entry, or one more).
    for p in &parked {
        assert!(p.reason.contains("no dead events here"), "{}", p.reason);
        assert_eq!(p.routing_key, "noop.dead");
        let event: JobEvent = codec::decode(p.content_type.as_deref(), &p.body_bytes().unwrap()).unwrap();
        assert_eq!((event.job_id.as_str(), event.status), (job.job_id.as_str(), JobStatus::Dead));
    }
    let letters = store.dead_letters(Some("noop")).await.unwrap();
    assert_eq!(letters.iter().filter_map(|l| l.job_id.as_deref()).collect::<Vec<_>>(), [job.job_id.as_str()], "the letter is listed");
    // The ack follows the park by one confirmed publish (the final event's copy on the stream):
    // wait for it, or stopping the recorder in between would return the letter unacked.
    let letters_queue = topo.dead_recorder_queue();
    eventually(20, "the letter acked", || async { (unacked(&letters_queue).await == 0).then_some(()) }).await;
    recorder.stop().await;
    assert_eq!(message_count(&ch, &letters_queue).await, 0, "the letter is acked");
    cleanup(&topo, &["noop"]).await;
}

/// A dead letter the store refuses as received (here a trigger refuses any reason with an
/// `è`) is listed ASCII-escaped, and its job's final event is recorded all the same: the
/// escaped fallback used to list the letter and skip the event, leaving the job `started`.
#[tokio::test]
async fn a_dead_letter_listed_escaped_still_records_its_jobs_final_event() {
    let (store, _dir, _) = sqlite_store().await;
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_job_type(&ch, "noop").await.unwrap();
    let refuse = refusing_inserts("refuse_accents", "dead_letters", "NEW.reason GLOB '*è*'", "no accents here");
    store.execute_raw(&refuse).await.unwrap();
    let recorder = spawn_recorder(&store, &topo);
    let job = spec("noop", "bot-accent");
    let props = worker_dead_letter(&job);
    let mut h = props.headers().clone().unwrap_or_default();
    headers::set_str(&mut h, headers::DEAD_REASON, "paramètre inconnu");
    publish_raw(&ch, &topo.dead_exchange(), "noop", &msgpack(&job), props.with_headers(h)).await;
    let row =
        eventually(20, "the job recorded dead", || async { store.job(&job.job_id).await.unwrap().filter(|j| j.status == JobStatus::Dead) })
            .await;
    assert_eq!(row.error.map(|e| e.message), Some("paramètre inconnu".to_string()), "the event keeps the reason as sent");
    let letters = store.dead_letters(Some("noop")).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].job_id.as_deref(), Some(job.job_id.as_str()));
    let listed = &letters[0].reason;
    assert!(listed.starts_with("param") && !listed.contains('è') && listed.contains("recorded escaped"), "listed escaped: {listed}");
    let letters_queue = topo.dead_recorder_queue();
    eventually(20, "the letter acked", || async { (unacked(&letters_queue).await == 0).then_some(()) }).await;
    recorder.stop().await;
    assert_eq!(message_count(&ch, &letters_queue).await, 0, "the letter is acked");
    cleanup(&topo, &["noop"]).await;
}

/// A dead letter's text comes back as it was recorded, and it is found and marked replayed by
/// it, on both backends: it is stored escaped (a NUL as `\0`, so the backslash as `\\`), and
/// was listed in that form, so a reason naming `C:\data\x.json` read `C:\\data\\x.json`.
async fn dead_letter_text_round_trips_on(url: &str) {
    let store = trainyard::store::Store::open(url).await.unwrap();
    let letter = trainyard::store::DeadLetter {
        id: "poison-one".into(),
        job_id: Some("not\\a\0uuid".into()),
        job_type: "noop".into(),
        bot: Some("bot\\x".into()),
        reason: "no file C:\\data\\x.json\0".into(),
        kind: "permanent".into(),
        attempt: 2,
        run: 0,
        broker_dead_lettered: false,
        body_preview: "{\"a\":\"\\\\\"}".into(),
        body: None,
        at: chrono::Utc::now(),
        replayed_at: None,
    };
    store.record_dead_letter(&letter).await.unwrap();
    let mut listed = store.dead_letters(Some("noop")).await.unwrap();
    for l in &mut listed {
        l.at = letter.at; // stored to the microsecond
    }
    assert_eq!(listed, std::slice::from_ref(&letter), "listed as recorded");
    store.mark_replayed(&letter.id, chrono::Utc::now()).await.unwrap();
    assert!(store.dead_letters(None).await.unwrap().is_empty(), "marked replayed");
    store.close().await;
}

#[tokio::test]
async fn a_dead_letters_text_comes_back_as_recorded_on_sqlite_and_postgres() {
    on_sqlite_and_postgres(|url| async move { dead_letter_text_round_trips_on(&url).await }).await;
}

/// A dead letter recorded after its job was replayed (the recorder had not taken its copy yet,
/// so the replay marked nothing) is recorded as replayed; a later run's letter lists again, and
/// an earlier run's copy arriving after it changes nothing. The first listed for good (and
/// replaying it answered that it is not in its queue); the last overwrote the later letter.
#[tokio::test]
async fn a_dead_letter_of_a_run_its_job_has_gone_past_does_not_list() {
    let (store, _dir, _) = sqlite_store().await;
    let job = spec("noop", "bot-runs");
    store.record_event(&JobEvent::queued(&job)).await.unwrap();
    let letter = |run: u32, reason: &str| trainyard::store::DeadLetter {
        id: job.job_id.clone(),
        job_id: Some(job.job_id.clone()),
        job_type: "noop".into(),
        bot: Some(job.bot.clone()),
        reason: reason.into(),
        kind: "permanent".into(),
        attempt: 1,
        run,
        broker_dead_lettered: false,
        body_preview: String::new(),
        body: None,
        at: chrono::Utc::now(),
        replayed_at: None,
    };
    // Replayed as run 1 before the recorder took run 0's letter.
    let mut replayed = JobEvent::queued(&job);
    replayed.run = Some(1);
    store.record_event(&replayed).await.unwrap();
    assert_eq!(store.job(&job.job_id).await.unwrap().unwrap().run, 1);
    store.record_dead_letter(&letter(0, "run 0 died")).await.unwrap();
    assert!(store.dead_letters(None).await.unwrap().is_empty(), "run 0's letter was replayed");
    store.record_dead_letter(&letter(1, "run 1 died")).await.unwrap();
    store.record_dead_letter(&letter(0, "run 0 died, a copy")).await.unwrap();
    let listed = store.dead_letters(None).await.unwrap();
    assert_eq!(listed.iter().map(|l| (l.run, l.reason.as_str())).collect::<Vec<_>>(), [(1, "run 1 died")]);
    // Marked replayed (its replay's run not recorded yet), then a copy of the same run: it
    // stays replayed (the copy listed it again).
    store.mark_replayed(&job.job_id, chrono::Utc::now()).await.unwrap();
    store.record_dead_letter(&letter(1, "run 1 died, a copy")).await.unwrap();
    assert!(store.dead_letters(None).await.unwrap().is_empty(), "still replayed");
}

/// The dead-letter list pages newest first, by time and then id, on both backends: letters of
/// one instant are neither skipped nor repeated across pages, and a type filters every page.
/// (`GET /v1/dlq` answered every letter not replayed, each with its whole body, in one answer.)
#[tokio::test]
async fn dead_letters_page_newest_first_on_sqlite_and_postgres() {
    on_sqlite_and_postgres(|url| async move {
        let store = trainyard::store::Store::open(&url).await.unwrap();
        let t0 = chrono::Utc::now();
        // Five noop letters, three of them at one instant, and one of another type.
        let letters: Vec<_> = [(0, "noop"), (1, "noop"), (1, "noop"), (1, "noop"), (2, "noop"), (3, "other")]
            .iter()
            .enumerate()
            .map(|(i, (s, t))| trainyard::store::DeadLetter {
                id: format!("letter-{i}"),
                job_id: None,
                job_type: t.to_string(),
                bot: None,
                reason: "r".into(),
                kind: "poison".into(),
                attempt: 1,
                run: 0,
                broker_dead_lettered: false,
                body_preview: String::new(),
                body: None,
                at: t0 + chrono::TimeDelta::seconds(*s),
                replayed_at: None,
            })
            .collect();
        for l in &letters {
            store.record_dead_letter(l).await.unwrap();
        }
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let page = store.dead_letters_page(Some("noop"), before.as_ref(), 2).await.unwrap();
            assert!(page.len() <= 2);
            seen.extend(page.iter().map(|l| l.id.clone()));
            match page.last().filter(|_| page.len() == 2) {
                Some(last) => before = Some(trainyard::store::JobCursor::after_letter(last)),
                None => break,
            }
        }
        assert_eq!(seen, ["letter-4", "letter-3", "letter-2", "letter-1", "letter-0"], "newest first, each once");
        let all = store.dead_letters_page(None, None, 100).await.unwrap();
        assert_eq!(all.first().map(|l| l.id.as_str()), Some("letter-5"));
        assert_eq!(all.len(), 6);
        store.close().await;
    })
    .await;
}
