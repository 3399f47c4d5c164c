//! A fixed pool of worker threads fed by a bounded queue (a
//! `Mutex<VecDeque>` and a `Condvar`).
//!
//! Invariants: the number of threads is fixed at creation; the queue never
//! holds more than `queue_limit` tasks (`submit` hands a task back instead
//! of growing it); `shutdown` wakes every idle worker and joins them all, so
//! no thread outlives the pool. A panicking task is caught and reported
//! through the `on_panic` callback; it does not cost the pool a worker.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

struct Queue<T> {
    tasks: VecDeque<T>,
    closed: bool,
}

struct Shared<T> {
    queue: Mutex<Queue<T>>,
    ready: Condvar,
}

/// The pool; `T` is the task type each worker receives.
pub struct Pool<T: Send + 'static> {
    shared: Arc<Shared<T>>,
    workers: Vec<JoinHandle<()>>,
    queue_limit: usize,
}

impl<T: Send + 'static> Pool<T> {
    /// Starts `threads` workers, each running `work(task)` for every task
    /// it takes, with stacks of `stack_size` bytes.
    pub fn new(
        name: &str,
        threads: usize,
        stack_size: usize,
        queue_limit: usize,
        work: impl Fn(T) + Send + Sync + 'static,
        on_panic: impl Fn(String) + Send + Sync + 'static,
    ) -> std::io::Result<Pool<T>> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                tasks: VecDeque::with_capacity(queue_limit),
                closed: false,
            }),
            ready: Condvar::new(),
        });
        let work = Arc::new(work);
        let on_panic = Arc::new(on_panic);
        let mut pool = Pool {
            shared,
            workers: Vec::with_capacity(threads),
            queue_limit,
        };
        for index in 0..threads {
            let shared = Arc::clone(&pool.shared);
            let work = Arc::clone(&work);
            let on_panic = Arc::clone(&on_panic);
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .stack_size(stack_size)
                .spawn(move || worker(&shared, &*work, &*on_panic));
            match handle {
                Ok(handle) => pool.workers.push(handle),
                Err(err) => {
                    pool.shutdown();
                    return Err(err);
                }
            }
        }
        Ok(pool)
    }

    /// Queues `task` for a worker, or hands it back if the queue is full
    /// or the pool is shutting down.
    pub fn submit(&self, task: T) -> Result<(), T> {
        let mut queue = lock(&self.shared.queue);
        if queue.closed || queue.tasks.len() >= self.queue_limit {
            return Err(task);
        }
        queue.tasks.push_back(task);
        drop(queue);
        self.shared.ready.notify_one();
        Ok(())
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    /// Lets the workers finish the tasks already queued, then joins them.
    pub fn shutdown(&mut self) {
        lock(&self.shared.queue).closed = true;
        self.shared.ready.notify_all();
        for handle in self.workers.drain(..) {
            let _ = handle.join();
        }
    }
}

impl<T: Send + 'static> Drop for Pool<T> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn worker<T>(shared: &Shared<T>, work: &(dyn Fn(T) + Sync), on_panic: &(dyn Fn(String) + Sync)) {
    loop {
        let task = {
            let mut queue = lock(&shared.queue);
            loop {
                if let Some(task) = queue.tasks.pop_front() {
                    break task;
                }
                if queue.closed {
                    return;
                }
                queue = shared
                    .ready
                    .wait(queue)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
        };
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| work(task))) {
            let text = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            on_panic(text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn runs_every_task_bounds_the_queue_and_joins() {
        let done = Arc::new(AtomicUsize::new(0));
        let panics = Arc::new(AtomicUsize::new(0));
        let (d, p) = (Arc::clone(&done), Arc::clone(&panics));
        let mut pool = Pool::new(
            "t",
            3,
            64 * 1024,
            1000,
            move |n: usize| {
                if n == 7 {
                    panic!("task 7");
                }
                d.fetch_add(1, Ordering::SeqCst);
            },
            move |_| {
                p.fetch_add(1, Ordering::SeqCst);
            },
        )
        .unwrap();
        assert_eq!(pool.threads(), 3);
        for n in 0..100 {
            pool.submit(n).unwrap();
        }
        pool.shutdown();
        assert_eq!(done.load(Ordering::SeqCst), 99);
        assert_eq!(panics.load(Ordering::SeqCst), 1);
        assert_eq!(pool.submit(1), Err(1));
    }
}
