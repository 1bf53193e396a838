use std::collections::HashMap;

use super::*;

/// Saved logs by attempt.
struct Saved(HashMap<u32, String>);

impl SavedLogs for &Saved {
    async fn saved(&self, attempt: u32) -> anyhow::Result<Option<String>> {
        Ok(self.0.get(&attempt).cloned())
    }
}

fn saved(logs: &[(u32, &str)]) -> Saved {
    Saved(logs.iter().map(|(a, t)| (*a, t.to_string())).collect())
}

fn piece(attempt: u32, offset: u64, text: &str) -> Piece {
    Piece { attempt, offset, text: text.into(), worker: "w1".into(), making: 0 }
}

fn printed(f: Follow<&Saved, Vec<u8>>) -> String {
    String::from_utf8(f.out).unwrap()
}

#[tokio::test]
async fn live_pieces_are_printed_once_in_order_and_the_saved_log_adds_only_its_rest() {
    let logs = saved(&[(1, "one\ntwo\nthree\nlast\n")]);
    let mut f = Follow::new(&logs, Vec::new(), None);
    assert!(!f.state(JobStatus::Started, 1).await.unwrap());
    f.piece(piece(1, 0, "one\n")).await.unwrap();
    f.piece(piece(1, 0, "one\ntwo\n")).await.unwrap(); // Sent again with more: only "two" is new.
    f.piece(piece(1, 4, "two\n")).await.unwrap(); // A duplicate.
    f.piece(piece(1, 8, "three\n")).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&f.out), "==> attempt 1 <==\none\ntwo\nthree\n", "printed before the attempt ends");
    assert!(f.state(JobStatus::Succeeded, 1).await.unwrap());
    f.piece(piece(1, 14, "late\n")).await.unwrap(); // A chunk after the end adds nothing.
    assert_eq!(printed(f), "==> attempt 1 <==\none\ntwo\nthree\nlast\n", "the same as `jobs logs` prints");
}

#[tokio::test]
async fn a_gap_is_one_line_and_attempts_follow_each_other_with_their_headers() {
    let logs = saved(&[(1, "a1\nb1\n"), (2, "a2\nb2\nc2\nd2\n")]);
    let mut f = Follow::new(&logs, Vec::new(), None);
    f.state(JobStatus::Started, 1).await.unwrap();
    // Attempt 2's first chunk says attempt 1 ended: its saved log comes first.
    f.piece(piece(2, 0, "a2\n")).await.unwrap();
    f.piece(piece(2, 6, "c2\n")).await.unwrap(); // "b2\n" (3 bytes) was lost.
    f.piece(piece(1, 3, "b1\n")).await.unwrap(); // A late chunk of the ended attempt.
    assert!(f.state(JobStatus::Succeeded, 2).await.unwrap());
    let want = "==> attempt 1 <==\na1\nb1\n==> attempt 2 <==\na2\n[… 3 bytes of attempt 2 were not received live …]\nc2\nd2\n";
    assert_eq!(printed(f), want);
}

#[tokio::test]
async fn one_attempt_only_without_headers_and_a_following_started_late_marks_what_it_missed() {
    let logs = saved(&[(1, "x\n"), (2, "early\nlater\nend\n")]);
    let mut f = Follow::new(&logs, Vec::new(), Some(2));
    // Attempt 1 ended before the follow began: not shown with `--attempt 2`.
    assert!(!f.state(JobStatus::Started, 2).await.unwrap());
    f.piece(piece(2, 6, "later\n")).await.unwrap();
    assert!(f.state(JobStatus::Retrying, 2).await.unwrap(), "attempt 2 ended");
    assert_eq!(printed(f), "[… 6 bytes of attempt 2 were not received live …]\nlater\nend\n");
}

#[tokio::test]
async fn a_redelivered_attempt_goes_on_after_its_new_start_and_a_differing_log_is_printed_whole() {
    let logs = saved(&[(1, "t1 old\n--- redelivery 1 ---\nt2 new\nt3 new\n")]);
    let mut f = Follow::new(&logs, Vec::new(), None);
    f.state(JobStatus::Started, 1).await.unwrap();
    f.piece(piece(1, 0, "t1 old\n")).await.unwrap();
    f.piece(Piece { worker: "w2".into(), ..piece(1, 0, "t2 new\n") }).await.unwrap();
    f.state(JobStatus::Succeeded, 1).await.unwrap();
    assert_eq!(printed(f), "==> attempt 1 <==\nt1 old\n--- attempt 1 continues on worker w2 ---\nt2 new\nt3 new\n");

    // Delivered again to the same worker (a new making of its log): the same, and a late
    // chunk of the log before adds nothing. It was taken for text already printed: skipped
    // while shorter than the old log, then printed from the old log's length, mid-line.
    let logs = saved(&[(1, "t1 old\n--- redelivery 1 ---\nt2\nt3 new\n")]);
    let mut f = Follow::new(&logs, Vec::new(), None);
    f.state(JobStatus::Started, 1).await.unwrap();
    f.piece(piece(1, 0, "t1 old\n")).await.unwrap();
    f.piece(Piece { making: 1, ..piece(1, 0, "t2\n") }).await.unwrap();
    f.piece(piece(1, 7, "t1 late\n")).await.unwrap();
    f.state(JobStatus::Succeeded, 1).await.unwrap();
    assert_eq!(printed(f), "==> attempt 1 <==\nt1 old\n--- attempt 1 continues on worker w1 ---\nt2\nt3 new\n");

    let logs = saved(&[(1, "something else\n")]);
    let mut f = Follow::new(&logs, Vec::new(), None);
    f.piece(piece(1, 0, "live\n")).await.unwrap();
    f.state(JobStatus::Failed, 1).await.unwrap();
    let want =
        "==> attempt 1 <==\nlive\n--- the saved log of attempt 1 differs from the live lines above; here it is whole ---\nsomething else\n";
    assert_eq!(printed(f), want);
}

#[tokio::test]
async fn an_attempt_without_a_saved_log_keeps_its_live_lines_and_nothing_is_added() {
    let logs = saved(&[]);
    let mut f = Follow::new(&logs, Vec::new(), None);
    f.piece(piece(1, 0, "routine\n")).await.unwrap();
    assert!(f.state(JobStatus::Succeeded, 1).await.unwrap());
    assert_eq!(printed(f), "==> attempt 1 <==\nroutine\n");
}

#[test]
fn a_job_row_gives_its_status_and_attempts() {
    let row = serde_json::json!({"status": "retrying", "attempts": 2});
    assert_eq!(row_state(&row), Some((JobStatus::Retrying, 2)));
    assert_eq!(row_state(&serde_json::json!({"status": "from-the-future", "attempts": 2})), None);
}
