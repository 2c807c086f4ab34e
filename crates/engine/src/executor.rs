//! The executor: runs graph snapshots on a background thread and streams what happens.
//!
//! The UI (or the command line) sends [`Command`]s and reads [`Event`]s over crossbeam
//! channels, so it never waits on the engine. Runs are queued in order. A cancel is noticed
//! between nodes and at every sampler step. Node outputs are cached by a key made of the node
//! type, its parameters and the keys of everything upstream, so changing only the seed re-runs
//! only the start, the sampler and what follows; cached nodes are announced as such. A node
//! that fails (or panics) fails its run, never the thread.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::ops::ControlFlow;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TryRecvError, unbounded};

use crate::error::InputError;
use crate::flow::sampler::{SampleError, StepRecord};
use crate::graph::value::Value;
use crate::graph::{Graph, ParamValue};
use crate::model::LatentPreview;
use crate::nodes::{
    self,
    context::{NodeContext, NodeDef, NodeEvent, RunEnv},
};
use crate::validate::{ValidationError, validate};

/// Identifies one queued run.
pub type RunId = u64;

/// What the executor is asked to do.
pub enum Command {
    Run {
        id: RunId,
        graph: Graph,
        env: RunEnv,
    },
    /// Cancels the run whether it is running or still queued.
    Cancel(RunId),
    Shutdown,
}

/// A sampler step as the UI sees it: the record (with the latents x_σ and x̂0) and the
/// model's latent→RGB map. The app turns latents into pixels on the GPU, so the executor
/// spends no time on previews.
#[derive(Debug, Clone)]
pub struct StepUpdate {
    pub record: StepRecord,
    /// The model's latent→RGB map, for previews drawn from the latents.
    pub preview: LatentPreview,
    /// When the executor sent it, to measure how fast a consumer shows it.
    pub sent_at: Instant,
}

/// Why a run failed.
#[derive(Debug, Clone)]
pub enum RunFailure {
    /// The graph did not validate; nothing ran.
    Invalid(Vec<ValidationError>),
    /// A node failed; `bad_input` when the user's input (file, parameter, prompt) was at fault.
    Node {
        node: String,
        message: String,
        bad_input: bool,
    },
}

impl std::fmt::Display for RunFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunFailure::Invalid(errors) => {
                let lines: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                write!(f, "the workflow is not valid:\n  {}", lines.join("\n  "))
            }
            RunFailure::Node { node, message, .. } => write!(f, "node {node:?} failed: {message}"),
        }
    }
}

/// Everything that happens during runs, in order.
#[derive(Debug, Clone)]
pub enum Event {
    RunStarted {
        run: RunId,
    },
    NodeStarted {
        run: RunId,
        node: String,
    },
    /// The node's outputs were served from the cache; it did not run.
    NodeCached {
        run: RunId,
        node: String,
    },
    NodeFinished {
        run: RunId,
        node: String,
        seconds: f64,
    },
    NodeFailed {
        run: RunId,
        node: String,
        message: String,
    },
    Warning {
        run: RunId,
        node: String,
        message: String,
    },
    /// Something worth knowing that is not a problem, e.g. the memory a model load needs.
    Info {
        run: RunId,
        node: String,
        message: String,
    },
    Step {
        run: RunId,
        node: String,
        step: Box<StepUpdate>,
    },
    /// A sampler finished: the σ values it used and how straight its path was.
    Trajectory {
        run: RunId,
        node: String,
        sigmas: Vec<f64>,
        straightness: f64,
    },
    /// An image for the user, and where it was saved if it was.
    Image {
        run: RunId,
        node: String,
        image: image::RgbImage,
        path: Option<PathBuf>,
    },
    RunFinished {
        run: RunId,
    },
    RunCancelled {
        run: RunId,
    },
    RunFailed {
        run: RunId,
        failure: RunFailure,
    },
}

impl Event {
    pub fn run(&self) -> RunId {
        match self {
            Event::RunStarted { run }
            | Event::NodeStarted { run, .. }
            | Event::NodeCached { run, .. }
            | Event::NodeFinished { run, .. }
            | Event::NodeFailed { run, .. }
            | Event::Warning { run, .. }
            | Event::Info { run, .. }
            | Event::Step { run, .. }
            | Event::Trajectory { run, .. }
            | Event::Image { run, .. }
            | Event::RunFinished { run }
            | Event::RunCancelled { run }
            | Event::RunFailed { run, .. } => *run,
        }
    }

    /// Whether this event ends its run.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Event::RunFinished { .. } | Event::RunCancelled { .. } | Event::RunFailed { .. }
        )
    }
}

/// A handle to the executor thread; dropping it shuts the thread down.
pub struct Executor {
    commands: Sender<Command>,
    events: Receiver<Event>,
    next_run: RunId,
    thread: Option<JoinHandle<()>>,
}

/// Gives the calling thread the lowest scheduling priority: Linux's idle policy (it runs only
/// when no other thread wants the core, and yields it at once when one does), and nice 19
/// where the policy is refused. Threads it starts inherit both; with id 0 both calls change
/// the calling thread alone. Under nice 19 alone the app's frames on a 2-core machine with the
/// software renderer took 24 ms at the median and 41 at the 99th percentile during a run; with
/// the idle policy 20 and 35 (`bench/frames.sh`, five runs each).
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority and sched_setscheduler only read their arguments (the parameter
    // block lives through the call); a failure leaves the priority as it was, which is
    // harmless.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
        let param = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
    }
}

impl Executor {
    pub fn spawn() -> Self {
        Self::spawn_with(|| {})
    }

    /// Like [`Executor::spawn`], but its thread, and the worker threads it starts, yield the
    /// CPU to every other thread of normal priority (on Linux; elsewhere as `spawn`): an app's
    /// UI then keeps drawing while a run fills the cores, at a small cost to the run where the
    /// UI is busy.
    pub fn spawn_in_background() -> Self {
        Self::spawn_with(lower_this_threads_priority)
    }

    fn spawn_with(setup: fn()) -> Self {
        let (commands, command_rx) = unbounded();
        let (event_tx, events) = unbounded();
        let thread = std::thread::Builder::new()
            .name("flowline-executor".into())
            .spawn(move || {
                setup();
                Worker::new(command_rx, event_tx).serve()
            })
            .expect("the executor thread starts");
        Executor {
            commands,
            events,
            next_run: 1,
            thread: Some(thread),
        }
    }

    /// Queues a snapshot of `graph` and returns its run id.
    pub fn run(&mut self, graph: Graph, env: RunEnv) -> RunId {
        let id = self.next_run;
        self.next_run += 1;
        let _ = self.commands.send(Command::Run { id, graph, env });
        id
    }

    pub fn cancel(&self, run: RunId) {
        let _ = self.commands.send(Command::Cancel(run));
    }

    /// The stream of events, for polling (`try_recv`) or waiting (`recv`).
    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Queued {
    id: RunId,
    graph: Graph,
    env: RunEnv,
}

struct CacheEntry {
    key: u64,
    outputs: Vec<Value>,
}

/// How a node's run ended, seen from the executor.
enum NodeEnd {
    Done(Vec<Value>),
    Cancelled,
    Failed { message: String, bad_input: bool },
}

struct Worker {
    commands: Receiver<Command>,
    events: Sender<Event>,
    queue: VecDeque<Queued>,
    cache: HashMap<String, CacheEntry>,
    /// Set when the running run is to stop at the next chance.
    cancel_requested: bool,
    shutdown: bool,
}

impl Worker {
    fn new(commands: Receiver<Command>, events: Sender<Event>) -> Self {
        Worker {
            commands,
            events,
            queue: VecDeque::new(),
            cache: HashMap::new(),
            cancel_requested: false,
            shutdown: false,
        }
    }

    fn serve(mut self) {
        while !self.shutdown {
            match self.queue.pop_front() {
                Some(run) => self.execute(run),
                None => match self.commands.recv() {
                    Ok(command) => self.handle(command, None),
                    Err(_) => return,
                },
            }
        }
    }

    fn send(&self, event: Event) {
        let _ = self.events.send(event);
    }

    /// Applies a command that arrived while `running` (if any) runs.
    fn handle(&mut self, command: Command, running: Option<RunId>) {
        match command {
            Command::Run { id, graph, env } => self.queue.push_back(Queued { id, graph, env }),
            Command::Cancel(id) if Some(id) == running => self.cancel_requested = true,
            Command::Cancel(id) => {
                let before = self.queue.len();
                self.queue.retain(|q| q.id != id);
                if self.queue.len() < before {
                    self.send(Event::RunCancelled { run: id });
                }
            }
            Command::Shutdown => {
                self.shutdown = true;
                self.cancel_requested = true;
            }
        }
    }

    /// Takes every waiting command; returns whether the running run should stop.
    fn poll(&mut self, running: RunId) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(command) => self.handle(command, Some(running)),
                Err(TryRecvError::Empty) => return self.cancel_requested,
                Err(TryRecvError::Disconnected) => {
                    self.shutdown = true;
                    return true;
                }
            }
        }
    }

    fn execute(&mut self, queued: Queued) {
        let run = queued.id;
        self.cancel_requested = false;
        self.send(Event::RunStarted { run });
        let plan = match validate(&queued.graph) {
            Ok(plan) => plan,
            Err(errors) => {
                let failure = RunFailure::Invalid(errors);
                return self.send(Event::RunFailed { run, failure });
            }
        };
        let mut keys: HashMap<&str, u64> = HashMap::new();
        let mut values: HashMap<(&str, &str), Value> = HashMap::new();
        for id in &plan.order {
            if self.poll(run) {
                return self.send(Event::RunCancelled { run });
            }
            let node = queued.graph.node(id).expect("planned nodes exist");
            let def = nodes::find(&node.type_name).expect("validated type");
            let params = &plan.params[id];
            let mut inputs = BTreeMap::new();
            let mut upstream_keys = Vec::new();
            for port in &def.spec.inputs {
                if let Some(link) = queued.graph.link_into(id, port.name) {
                    upstream_keys.push((
                        port.name,
                        keys[link.from.node.as_str()],
                        link.from.port.as_str(),
                    ));
                    let value = values[&(link.from.node.as_str(), link.from.port.as_str())].clone();
                    inputs.insert(port.name, value);
                }
            }
            let key = cache_key(&node.type_name, params, &upstream_keys);
            keys.insert(id, key);
            let cached = self
                .cache
                .get(id.as_str())
                .filter(|entry| entry.key == key && !def.spec.is_output)
                .map(|entry| entry.outputs.clone());
            let outputs = match cached {
                Some(outputs) => {
                    self.send(Event::NodeCached {
                        run,
                        node: id.clone(),
                    });
                    outputs
                }
                None => {
                    self.send(Event::NodeStarted {
                        run,
                        node: id.clone(),
                    });
                    let started = Instant::now();
                    match self.run_node(run, id, def, &queued.env, inputs, params.clone()) {
                        NodeEnd::Done(outputs) => {
                            let seconds = started.elapsed().as_secs_f64();
                            self.send(Event::NodeFinished {
                                run,
                                node: id.clone(),
                                seconds,
                            });
                            if !def.spec.is_output {
                                let entry = CacheEntry {
                                    key,
                                    outputs: outputs.clone(),
                                };
                                self.cache.insert(id.clone(), entry);
                            }
                            outputs
                        }
                        NodeEnd::Cancelled => return self.send(Event::RunCancelled { run }),
                        NodeEnd::Failed { message, bad_input } => {
                            self.send(Event::NodeFailed {
                                run,
                                node: id.clone(),
                                message: message.clone(),
                            });
                            let failure = RunFailure::Node {
                                node: id.clone(),
                                message,
                                bad_input,
                            };
                            return self.send(Event::RunFailed { run, failure });
                        }
                    }
                }
            };
            for (port, value) in def.spec.outputs.iter().zip(outputs) {
                values.insert((id.as_str(), port.name), value);
            }
        }
        self.send(Event::RunFinished { run });
    }

    fn run_node(
        &mut self,
        run: RunId,
        id: &str,
        def: &NodeDef,
        env: &RunEnv,
        inputs: BTreeMap<&'static str, Value>,
        params: BTreeMap<String, ParamValue>,
    ) -> NodeEnd {
        let mut on_event = |event: NodeEvent| self.forward(run, id, event);
        let mut ctx = NodeContext::new(id, &def.spec, env, inputs, params, &mut on_event);
        let result = catch_unwind(AssertUnwindSafe(|| (def.run)(&mut ctx)));
        match result {
            Ok(Ok(outputs)) => NodeEnd::Done(outputs),
            Ok(Err(error)) => {
                if matches!(
                    error.downcast_ref::<SampleError>(),
                    Some(SampleError::Cancelled { .. })
                ) {
                    return NodeEnd::Cancelled;
                }
                let bad_input = error.chain().any(|cause| cause.is::<InputError>());
                NodeEnd::Failed {
                    message: format!("{error:#}"),
                    bad_input,
                }
            }
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                NodeEnd::Failed {
                    message: format!("internal error: {what}"),
                    bad_input: false,
                }
            }
        }
    }

    /// Turns a node's event into an executor event; steps are also where cancels are noticed.
    fn forward(&mut self, run: RunId, id: &str, event: NodeEvent) -> ControlFlow<()> {
        let node = id.to_string();
        match event {
            NodeEvent::Step(record, preview) => {
                let step = Box::new(StepUpdate {
                    record,
                    preview,
                    sent_at: Instant::now(),
                });
                self.send(Event::Step { run, node, step });
                if self.poll(run) {
                    return ControlFlow::Break(());
                }
            }
            NodeEvent::Trajectory(output) => self.send(Event::Trajectory {
                run,
                node,
                sigmas: output.sigmas,
                straightness: output.straightness,
            }),
            NodeEvent::Image { image, path } => match crate::model::image_from_tensor(&image.0) {
                Ok(image) => self.send(Event::Image {
                    run,
                    node,
                    image,
                    path,
                }),
                Err(e) => {
                    let message = format!("cannot show the image: {e}");
                    self.send(Event::Warning { run, node, message });
                }
            },
            NodeEvent::Warning(message) => self.send(Event::Warning { run, node, message }),
            NodeEvent::Info(message) => self.send(Event::Info { run, node, message }),
        }
        ControlFlow::Continue(())
    }
}

/// The cache key of a node: its type, its complete parameters and its inputs' keys.
fn cache_key(
    type_name: &str,
    params: &BTreeMap<String, ParamValue>,
    upstream: &[(&str, u64, &str)],
) -> u64 {
    let mut hasher = DefaultHasher::new();
    type_name.hash(&mut hasher);
    serde_json::to_string(params)
        .expect("parameters serialise")
        .hash(&mut hasher);
    upstream.hash(&mut hasher);
    hasher.finish()
}
