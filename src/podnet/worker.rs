//! The one thread that enters pods' network namespaces: started on first use, fed jobs through
//! a channel, alive between passes. A job runs wholly on it (entering each namespace in turn);
//! afterwards the thread goes back to the namespace it started in, so it holds no pod's
//! namespace alive while idle, and nothing else ever runs on it.
//!
//! Why not a thread per pass: each new thread costs a stack and, with glibc, may get a malloc
//! arena of its own whose pages outlive the thread; an agent that passes every few seconds
//! pays that again and again for no gain (measured in docs/BENCHMARKS.md).
use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Mutex, PoisonError};

use super::error::PodNetError;
use super::sys;

/// A job gets the thread's home namespace and says whether the thread got back to it.
type Job = Box<dyn FnOnce(&OwnedFd) -> bool + Send>;

/// The thread's inbox; `None` until first use, or after the thread ended.
static INBOX: Mutex<Option<SyncSender<Job>>> = Mutex::new(None);

/// The namespace the thread starts in (the agent's own) and returns to after every job.
const HOME: &str = "/proc/thread-self/ns/net";

/// Runs `job` on the namespace thread and returns its result. Callers take turns: the lock is
/// held until the job is done, so one job at a time, in the order asked.
pub(crate) fn run<T, F>(job: F) -> Result<T, PodNetError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let mut inbox = INBOX.lock().unwrap_or_else(PoisonError::into_inner);
    let (reply, result) = mpsc::sync_channel(1);
    let mut job: Job = Box::new(move |home| {
        let out = job();
        // Home before the reply: once the caller has its result the thread is in no pod's
        // namespace (or has given up and is ending).
        let home = go_home(home);
        // The caller waits on `result`; it cannot have gone.
        let _ = reply.send(out);
        home
    });
    // A thread that ended (it could not go home after a job, or a job panicked) has dropped
    // its receiver: the job comes back and goes to a new thread.
    for _ in 0..2 {
        let sender = match inbox.take() {
            Some(sender) => sender,
            None => start()?,
        };
        match sender.send(job) {
            Ok(()) => {
                *inbox = Some(sender);
                return result
                    .recv()
                    .map_err(|_| PodNetError::Thread("ended during a job".into()));
            }
            Err(mpsc::SendError(back)) => job = back,
        }
    }
    Err(PodNetError::Thread("a new thread took no job".into()))
}

fn start() -> Result<SyncSender<Job>, PodNetError> {
    let (sender, jobs) = mpsc::sync_channel::<Job>(0);
    let (ready, started) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("nodetune-podnet".into())
        .spawn(move || {
            // Opened on the thread itself, before it enters anything: its own namespace.
            match File::open(HOME) {
                Ok(home) => {
                    let _ = ready.send(Ok(()));
                    serve(&jobs, &OwnedFd::from(home));
                }
                Err(e) => {
                    let _ = ready.send(Err(format!("{HOME}: {e}")));
                }
            }
        })
        .map_err(|e| PodNetError::Thread(e.to_string()))?;
    match started.recv() {
        Ok(Ok(())) => Ok(sender),
        Ok(Err(why)) => Err(PodNetError::Thread(why)),
        Err(_) => Err(PodNetError::Thread("ended before its first job".into())),
    }
}

/// Runs jobs until the inbox closes, each going home when done; ends when one could not (a
/// thread left in a pod's namespace must not serve again).
fn serve(jobs: &Receiver<Job>, home: &OwnedFd) {
    for job in jobs {
        if !job(home) {
            return;
        }
    }
}

fn go_home(home: &OwnedFd) -> bool {
    match sys::setns_net(home) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "the pod namespace thread could not return home; it ends");
            false
        }
    }
}
