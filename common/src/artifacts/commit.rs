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
//! for its own flushes. `syncfs` also writes back whatever else is dirty on that filesystem
//! (a checkpoint a job just wrote, say), which a record naming such outputs needs anyway.

use std::{
    fs::File,
    io::{ErrorKind, Write},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::mpsc,
};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::local;

/// Most records in one batch.
const MAX_BATCH: usize = 1024;

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
        std::thread::Builder::new().name("trainyard-commit".into()).spawn(move || run(&rx))?;
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

fn run(rx: &mpsc::Receiver<Request>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter().take(MAX_BATCH - 1));
        commit(batch, &mut |file| rustix::fs::syncfs(file).map_err(Into::into));
    }
}

/// Stages, flushes, links and flushes again one batch, then answers each request. `flush`
/// makes everything written on the filesystem of a file durable (`syncfs`).
fn commit(batch: Vec<Request>, flush: &mut dyn FnMut(&File) -> std::io::Result<()>) {
    let mut staged = Vec::with_capacity(batch.len());
    for r in batch {
        match stage(&r) {
            Ok((file, path)) => staged.push((r, file, path)),
            Err(e) => {
                let _ = r.done.send(Err(e));
            }
        }
    }
    // Every staged file's data is on disk before a name points at it.
    if let Err(e) = flush_each_filesystem(staged.iter().map(|(_, file, _)| file), flush) {
        for (r, _, path) in staged {
            let _ = std::fs::remove_file(&path);
            let _ = r.done.send(Err(copy(&e)));
        }
        return;
    }
    let linked: Vec<_> = staged
        .into_iter()
        .map(|(r, file, path)| {
            let linked = std::fs::hard_link(&path, &r.path);
            let _ = std::fs::remove_file(&path);
            (r, file, linked)
        })
        .collect();
    // The new names are on disk before anyone is told.
    let flushed = flush_each_filesystem(linked.iter().filter(|(_, _, l)| l.is_ok()).map(|(_, file, _)| file), flush);
    for (r, _, linked) in linked {
        let answer = match linked {
            Ok(()) => flushed.as_ref().map(|()| true).map_err(copy),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        };
        let _ = r.done.send(answer);
    }
}

/// A staged file beside the request's path holding its bytes, not yet flushed.
fn stage(r: &Request) -> std::io::Result<(File, PathBuf)> {
    let (mut file, path) = local::staged_file(&r.path)?;
    if let Err(e) = file.write_all(&r.bytes) {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok((file, path))
}

/// Calls `flush` once per filesystem (device) among `files`.
fn flush_each_filesystem<'a>(
    files: impl Iterator<Item = &'a File>,
    flush: &mut dyn FnMut(&File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut done = Vec::new();
    for file in files {
        let dev = file.metadata()?.dev();
        if !done.contains(&dev) {
            flush(file)?;
            done.push(dev);
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
    /// already there (before the batch, or earlier in the same batch).
    #[test]
    fn a_batch_is_flushed_twice_and_each_record_created_once() {
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
        commit(batch, &mut |_| {
            flushes += 1;
            Ok(())
        });
        assert_eq!(flushes, 2, "one flush before the links, one after");
        for (i, (mut answer, expected)) in answers.into_iter().enumerate() {
            assert_eq!(answer.try_recv().unwrap().unwrap(), expected, "request {i}");
        }
        assert_eq!(std::fs::read_to_string(dir.path().join("outcomes/cd/7.json")).unwrap(), "7");
        assert_eq!(std::fs::read_to_string(dir.path().join("outcomes/ab/0.json")).unwrap(), "0", "the first one wins");
        assert_eq!(std::fs::read_to_string(dir.path().join("outcomes/ab/old.json")).unwrap(), "old");
        assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
    }

    /// When the data cannot be flushed, no record is created and every request is told.
    #[test]
    fn a_failed_flush_creates_nothing_and_fails_every_request() {
        let dir = tempfile::tempdir().unwrap();
        let (r1, mut a1) = request(dir.path().join("outcomes/ab/1.json"), "1");
        let (r2, mut a2) = request(dir.path().join("outcomes/ab/2.json"), "2");
        commit(vec![r1, r2], &mut |_| Err(std::io::Error::other("disk on fire")));
        for a in [&mut a1, &mut a2] {
            assert!(a.try_recv().unwrap().unwrap_err().to_string().contains("disk on fire"));
        }
        assert!(walk(dir.path()).iter().all(|n| !n.ends_with(".json")), "{:?}", walk(dir.path()));
        assert!(leftovers(dir.path()).is_empty());
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
