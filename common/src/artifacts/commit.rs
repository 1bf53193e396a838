//! Group commit of create-once records on a local directory (Linux).
//!
//! A record survives a machine crash after two flushes: its data before the hard link that
//! gives it its name, and that name after. Synced record by record (`fdatasync`, then an
//! `fsync` of its directory) that is two device flushes per job, and they cost the disk, the
//! broker beside it and the worker more than the rest of a short job. Here one thread takes
//! every record waiting, writes each to its staged file, flushes them all with one `syncfs`
//! per filesystem, links each into place, and flushes the new names with one more: two
//! flushes per batch, however many records it holds. Records that arrive while a batch is
//! flushed form the next one, so batches grow with the load and a lone record waits only
//! for its own flushes; while records keep arriving, one flush serves as the second of a
//! batch and the first of the next. Under load (the batch before held 8 records or more) the
//! thread waits 5 ms after a batch's first record for more to arrive: each `syncfs` costs the
//! disk, and the broker writing to it, about the same whatever the batch holds, so fewer and
//! larger batches cost less a record, for 5 ms more latency at that load and none for a lone
//! record. `syncfs` also writes back whatever else is dirty on that filesystem
//! (a checkpoint a job just wrote, say), which a record naming such outputs needs anyway.
//!
//! A record is staged in an unnamed file of its directory (`O_TMPFILE`) and linked from
//! `/proc/self/fd`: no name to create and remove per record, which cost this disk more than
//! the data. Where the filesystem or `/proc` cannot do that, it is staged in a named file
//! beside its place (`<name>#<n>`, which listings skip), linked, and the staged name removed.

use std::{
    fs::File,
    io::{ErrorKind, Write},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    sync::mpsc,
    time::Duration,
};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::local;

/// Most records in one batch.
const MAX_BATCH: usize = 1024;

/// Under load, how long the committer lets more records arrive before it stages a batch.
const GROUP_WAIT: Duration = Duration::from_millis(5);
/// The load that earns [`GROUP_WAIT`]: the batch before held at least this many records.
const GROUP_SIBLINGS: usize = 8;

/// How long to wait for more records after the first of a batch, given the size of the
/// batch before: [`GROUP_WAIT`] under load, nothing for a lone record (PostgreSQL's
/// `commit_delay` and `commit_siblings`, in effect).
fn group_wait(last_batch: usize) -> Option<Duration> {
    (last_batch >= GROUP_SIBLINGS).then_some(GROUP_WAIT)
}

/// One record to create, and where its answer goes.
struct Request {
    path: PathBuf,
    bytes: Bytes,
    done: oneshot::Sender<std::io::Result<bool>>,
}

/// The committing thread of one store: started on its first record, it ends when the
/// store's last handle is dropped.
#[derive(Debug)]
pub(super) struct Committer {
    tx: mpsc::Sender<Request>,
}

impl Committer {
    /// Starts the thread.
    pub(super) fn start() -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let unnamed = Path::new("/proc/self/fd").is_dir();
        std::thread::Builder::new().name("trainyard-commit".into()).spawn(move || run(&rx, unnamed))?;
        Ok(Self { tx })
    }

    /// Creates `path` with `bytes` unless it exists (`false` then), durably, as
    /// [`local::create`] does, in the next batch.
    pub(super) async fn create(&self, path: PathBuf, bytes: Bytes) -> std::io::Result<bool> {
        let stopped = || std::io::Error::other("the record committer has stopped");
        let (done, answer) = oneshot::channel();
        self.tx.send(Request { path, bytes, done }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn run(rx: &mpsc::Receiver<Request>, unnamed: bool) {
    let flush = &mut |file: &File| rustix::fs::syncfs(file).map_err(Into::into);
    // The batch linked last, until a flush makes its names durable.
    let mut linked: Option<Linked> = None;
    let mut last_batch = 0usize;
    loop {
        let first = match linked {
            // Records waiting: their flush also makes the linked batch's names durable.
            Some(_) => match rx.try_recv() {
                Ok(first) => first,
                Err(_) => {
                    finish(linked.take(), flush);
                    continue;
                }
            },
            None => match rx.recv() {
                Ok(first) => first,
                Err(_) => return,
            },
        };
        if let Some(wait) = group_wait(last_batch) {
            std::thread::sleep(wait);
        }
        let mut batch = vec![first];
        batch.extend(rx.try_iter().take(MAX_BATCH - 1));
        last_batch = batch.len();
        linked = step(batch, linked.take(), unnamed, flush);
    }
}

/// Stages, flushes, links and flushes again one batch, then answers each request.
#[cfg(test)]
fn commit(batch: Vec<Request>, unnamed: bool, flush: &mut dyn FnMut(&File) -> std::io::Result<()>) {
    let linked = step(batch, None, unnamed, flush);
    finish(linked, flush);
}

/// Records linked under their names (or refused one), not yet answered: their names are
/// durable after the next flush.
struct Linked(Vec<(Request, Staged, std::io::Result<()>)>);

/// Stages `batch`; flushes it together with the names `before` linked and answers those;
/// links `batch`, whose names the next flush makes durable. `flush` makes everything written
/// on the filesystem of a file durable (`syncfs`); `unnamed`: stage in unnamed files where
/// the filesystem can. One flush per batch under load: the second flush of each batch is the
/// first of the next.
fn step(batch: Vec<Request>, before: Option<Linked>, unnamed: bool, flush: &mut dyn FnMut(&File) -> std::io::Result<()>) -> Option<Linked> {
    let mut staged = Vec::with_capacity(batch.len());
    for r in batch {
        match stage(&r, unnamed) {
            Ok(s) => staged.push((r, s)),
            Err(e) => {
                let _ = r.done.send(Err(e));
            }
        }
    }
    // Every staged file's data is on disk before a name points at it.
    let before = before.map_or_else(Vec::new, |l| l.0);
    let names = before.iter().filter(|(_, _, l)| l.is_ok()).map(|(_, s, _)| s);
    let flushed = flush_each_filesystem(staged.iter().map(|(_, s)| s).chain(names), flush);
    answer(before, &flushed);
    if let Err(e) = flushed {
        for (r, s) in staged {
            s.discard();
            let _ = r.done.send(Err(copy(&e)));
        }
        return None;
    }
    Some(Linked(
        staged
            .into_iter()
            .map(|(r, s)| {
                let linked = s.link(&r.path);
                (r, s, linked)
            })
            .collect(),
    ))
}

/// Flushes the names of a linked batch and answers it.
fn finish(linked: Option<Linked>, flush: &mut dyn FnMut(&File) -> std::io::Result<()>) {
    let Some(Linked(linked)) = linked else { return };
    let flushed = flush_each_filesystem(linked.iter().filter(|(_, _, l)| l.is_ok()).map(|(_, s, _)| s), flush);
    answer(linked, &flushed);
}

/// Answers each linked record once `flushed` made the names durable (or failed to).
fn answer(linked: Vec<(Request, Staged, std::io::Result<()>)>, flushed: &std::io::Result<()>) {
    for (r, _, linked) in linked {
        let answer = match linked {
            Ok(()) => flushed.as_ref().map(|()| true).map_err(copy),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        };
        let _ = r.done.send(answer);
    }
}

/// A record's bytes, not yet flushed, in a file no reader can see under the record's name.
struct Staged {
    file: File,
    /// The staged file's name; `None` for an unnamed file.
    name: Option<PathBuf>,
    /// The device of its filesystem (looked up once: the batch's two flushes both need it).
    dev: u64,
}

impl Staged {
    /// Gives the staged data the record's name (`AlreadyExists` when it is taken), and
    /// removes a staged name.
    fn link(&self, path: &Path) -> std::io::Result<()> {
        match &self.name {
            Some(staged) => {
                let linked = std::fs::hard_link(staged, path);
                let _ = std::fs::remove_file(staged);
                linked
            }
            None => {
                let fd = format!("/proc/self/fd/{}", self.file.as_raw_fd());
                let cwd = rustix::fs::CWD;
                rustix::fs::linkat(cwd, fd.as_str(), cwd, path, rustix::fs::AtFlags::SYMLINK_FOLLOW).map_err(Into::into)
            }
        }
    }

    fn discard(&self) {
        if let Some(staged) = &self.name {
            let _ = std::fs::remove_file(staged);
        }
    }
}

/// The request's bytes in a staged file: unnamed in its directory when `unnamed` and the
/// filesystem can, else named beside it.
fn stage(r: &Request, unnamed: bool) -> std::io::Result<Staged> {
    let unnamed = if unnamed { unnamed_file(&r.path)? } else { None };
    let (file, name) = match unnamed {
        Some(file) => (file, None),
        None => local::staged_file(&r.path).map(|(file, name)| (file, Some(name)))?,
    };
    let mut staged = Staged { file, name, dev: 0 };
    let written = staged.file.metadata().and_then(|m| {
        staged.dev = m.dev();
        staged.file.write_all(&r.bytes)
    });
    if let Err(e) = written {
        staged.discard();
        return Err(e);
    }
    Ok(staged)
}

/// An unnamed file in the directory of `path` (created with its missing ancestors), or
/// `None` where the filesystem makes none.
fn unnamed_file(path: &Path) -> std::io::Result<Option<File>> {
    use rustix::{fs::Mode, fs::OFlags, io::Errno};
    let dir = local::parent(path);
    let open = || rustix::fs::open(dir, OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC, Mode::from_bits_truncate(0o644));
    let opened = match open() {
        Err(Errno::NOENT) => {
            local::create_dirs(dir)?;
            open()
        }
        other => other,
    };
    match opened {
        Ok(fd) => Ok(Some(File::from(fd))),
        Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL | Errno::NOSYS) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Calls `flush` once per filesystem (device) among `files`.
fn flush_each_filesystem<'a>(
    files: impl Iterator<Item = &'a Staged>,
    flush: &mut dyn FnMut(&File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut done = Vec::new();
    for staged in files {
        if !done.contains(&staged.dev) {
            flush(&staged.file)?;
            done.push(staged.dev);
        }
    }
    Ok(())
}

fn copy(e: &std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(path: PathBuf, text: &str) -> (Request, oneshot::Receiver<std::io::Result<bool>>) {
        let (done, answer) = oneshot::channel();
        (Request { path, bytes: Bytes::from(text.to_string()), done }, answer)
    }

    /// A lone record is staged at once; under load the committer waits for more.
    #[test]
    fn only_a_loaded_committer_waits_for_more_records() {
        assert_eq!(group_wait(0), None, "the first record after a quiet spell");
        assert_eq!(group_wait(GROUP_SIBLINGS - 1), None);
        assert_eq!(group_wait(GROUP_SIBLINGS), Some(GROUP_WAIT));
        assert!(GROUP_WAIT <= Duration::from_millis(10), "a wait that would hold up jobs more than their flushes do");
    }

    fn leftovers(dir: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = walk(dir).into_iter().filter(|n| n.contains('#')).collect();
        names.sort();
        names
    }

    fn walk(dir: &std::path::Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .flat_map(|e| {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    walk(&e.path())
                } else {
                    vec![e.path().display().to_string()]
                }
            })
            .collect()
    }

    /// A batch of any size costs two flushes; each request gets its own answer: created,
    /// already there (before the batch, or earlier in the same batch). Staged unnamed, no
    /// name appears before the links; staged named, only `#` names do.
    #[test]
    fn a_batch_is_flushed_twice_and_each_record_created_once() {
        for unnamed in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("outcomes/ab")).unwrap();
            std::fs::write(dir.path().join("outcomes/ab/old.json"), "old").unwrap();
            let mut batch = Vec::new();
            let mut answers = Vec::new();
            for i in 0..50 {
                // Half in a shard directory that does not exist yet.
                let shard = if i % 2 == 0 { "ab" } else { "cd" };
                let (r, a) = request(dir.path().join(format!("outcomes/{shard}/{i}.json")), &format!("{i}"));
                batch.push(r);
                answers.push((a, true));
            }
            for (name, expected) in [("outcomes/ab/old.json", false), ("outcomes/ab/0.json", false)] {
                let (r, a) = request(dir.path().join(name), "again");
                batch.push(r);
                answers.push((a, expected));
            }
            let mut flushes = 0;
            let mut staged_names = 0;
            commit(batch, unnamed, &mut |_| {
                if flushes == 0 {
                    let names = walk(dir.path());
                    assert_eq!(names.iter().filter(|n| n.ends_with(".json")).count(), 1, "only the old record: {names:?}");
                    staged_names = leftovers(dir.path()).len();
                }
                flushes += 1;
                Ok(())
            });
            assert_eq!(flushes, 2, "one flush before the links, one after");
            assert_eq!(staged_names, if unnamed { 0 } else { 52 }, "unnamed: {unnamed}");
            for (i, (mut answer, expected)) in answers.into_iter().enumerate() {
                assert_eq!(answer.try_recv().unwrap().unwrap(), expected, "request {i}");
            }
            assert_eq!(std::fs::read_to_string(dir.path().join("outcomes/cd/7.json")).unwrap(), "7");
            assert_eq!(std::fs::read_to_string(dir.path().join("outcomes/ab/0.json")).unwrap(), "0", "the first one wins");
            assert_eq!(std::fs::read_to_string(dir.path().join("outcomes/ab/old.json")).unwrap(), "old");
            assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
        }
    }

    /// When the data cannot be flushed, no record is created and every request is told.
    #[test]
    fn a_failed_flush_creates_nothing_and_fails_every_request() {
        for unnamed in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let (r1, mut a1) = request(dir.path().join("outcomes/ab/1.json"), "1");
            let (r2, mut a2) = request(dir.path().join("outcomes/ab/2.json"), "2");
            commit(vec![r1, r2], unnamed, &mut |_| Err(std::io::Error::other("disk on fire")));
            for a in [&mut a1, &mut a2] {
                assert!(a.try_recv().unwrap().unwrap_err().to_string().contains("disk on fire"));
            }
            assert!(walk(dir.path()).iter().all(|n| !n.ends_with(".json")), "{:?}", walk(dir.path()));
            assert!(leftovers(dir.path()).is_empty());
        }
    }

    /// Under load a batch's names are made durable by the next batch's flush: two batches,
    /// three flushes; each batch answered only after the flush that follows its links. A failed
    /// flush fails the batch linked before it as well as its own, and creates none of its own.
    #[test]
    fn the_next_batch_flushes_the_names_of_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = |i: u32| dir.path().join(format!("outcomes/ab/{i}.json"));
        let flushes = std::cell::Cell::new(0);
        let mut count = |_: &File| {
            flushes.set(flushes.get() + 1);
            Ok(())
        };
        let (r1, mut a1) = request(path(1), "1");
        let linked = step(vec![r1], None, true, &mut count);
        assert!(a1.try_recv().is_err(), "not answered before its names are flushed");
        assert!(path(1).exists());
        let (r2, mut a2) = request(path(2), "2");
        let linked = step(vec![r2], linked, true, &mut count);
        assert!(a1.try_recv().unwrap().unwrap());
        assert!(a2.try_recv().is_err());
        finish(linked, &mut count);
        assert!(a2.try_recv().unwrap().unwrap());
        assert_eq!(flushes.get(), 3);

        let (r3, mut a3) = request(path(3), "3");
        let linked = step(vec![r3], None, true, &mut count);
        let (r4, mut a4) = request(path(4), "4");
        let linked = step(vec![r4], linked, true, &mut |_| Err(std::io::Error::other("disk on fire")));
        assert!(linked.is_none());
        for a in [&mut a3, &mut a4] {
            assert!(a.try_recv().unwrap().unwrap_err().to_string().contains("disk on fire"));
        }
        assert!(!path(4).exists());
    }

    /// Through the thread: concurrent creates of the same key make one record, one `true`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_creates_of_one_key_make_one_record() {
        let dir = tempfile::tempdir().unwrap();
        let committer = std::sync::Arc::new(Committer::start().unwrap());
        let path = dir.path().join("outcomes/ab/x.json");
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let (c, p) = (committer.clone(), path.clone());
                tokio::spawn(async move { c.create(p, Bytes::from(format!("{i}"))).await.unwrap() })
            })
            .collect();
        let mut created = 0;
        for t in tasks {
            created += usize::from(t.await.unwrap());
        }
        assert_eq!(created, 1);
        assert!(std::fs::read_to_string(&path).unwrap().parse::<u32>().unwrap() < 32);
        assert!(leftovers(dir.path()).is_empty());
    }
}
