//! The app driven as a user drives it, through egui_kittest: clicks, drags, keys and dropped
//! files go in as input events, and what the app then holds and draws is checked.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eframe::egui::{self, Id, Key, Modifiers, Pos2, Rect};
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use flowline_engine::graph::ParamValue;

use super::files::Recovery;
use super::runs::RunState;
use super::{FlowlineApp, GRAPH_ID};

/// A file dropped from the desktop.
#[derive(Debug)]
struct FileOnDisk(PathBuf);

impl egui::DroppedFile for FileOnDisk {
    fn path(&self) -> &Path {
        &self.0
    }

    fn bytes(&self) -> Result<Vec<u8>, String> {
        std::fs::read(&self.0).map_err(|e| e.to_string())
    }
}

struct Fixture {
    harness: Harness<'static, FlowlineApp>,
    dir: tempfile::TempDir,
}

fn app(gpu: bool) -> Fixture {
    flowline_engine::model::install_families(flowline_shapes::FAMILIES);
    let dir = tempfile::tempdir().unwrap();
    let recovery = Recovery::at(dir.path().join("recovery.json"));
    let output = dir.path().join("out");
    let mut builder = Harness::builder()
        .with_size([1400.0, 900.0])
        .with_step_dt(1.0 / 60.0);
    if gpu {
        builder = builder.wgpu();
    }
    let mut harness = builder.build_eframe(move |cc| {
        let mut app = FlowlineApp::new(cc, None, recovery);
        app.output_dir = output;
        app
    });
    harness.run_steps(4);
    Fixture { harness, dir }
}

impl Fixture {
    fn app(&self) -> &FlowlineApp {
        self.harness.state()
    }

    /// A node's frame in graph coordinates, by workflow id.
    fn node_frame(&self, id: &str) -> Rect {
        let app = self.app();
        let node = app.document().node_by_workflow_id(id).expect("node exists");
        app.node_rects[&node]
    }

    /// A node's frame on screen, by workflow id.
    fn node_rect(&self, id: &str) -> Rect {
        self.app().transform * self.node_frame(id)
    }

    /// Where the pin of port label `port` on node `id` is on screen: between the label and the
    /// frame's edge. (Widgets on the canvas report graph coordinates to accesskit.)
    fn pin(&self, id: &str, port: &str, output: bool) -> Pos2 {
        let frame = self.node_frame(id);
        let label = self
            .harness
            .get_all_by_label(port)
            .map(|n| n.rect())
            .find(|r| frame.contains_rect(*r))
            .unwrap_or_else(|| panic!("no label {port:?} on node {id}"));
        let x = if output {
            (label.right() + frame.right()) / 2.0
        } else {
            (label.left() + frame.left()) / 2.0
        };
        self.app().transform * egui::pos2(x, label.center().y)
    }

    /// Presses or releases `button` at `pos`, with the pointer staying there.
    fn button(&self, pos: Pos2, button: egui::PointerButton, pressed: bool, modifiers: Modifiers) {
        self.harness.event(egui::Event::PointerButton {
            pos,
            button,
            pressed,
            modifiers,
        });
    }

    /// Sets parameter `param` of node `id`, as its widget would.
    fn set_param(&mut self, id: &str, param: &str, value: ParamValue) {
        let doc = &mut self.harness.state_mut().doc;
        let node = doc.node_by_workflow_id(id).expect("node exists");
        doc.snarl[node].params.insert(param.into(), value);
    }

    fn drag(&mut self, from: Pos2, to: Pos2) {
        self.harness.hover_at(from);
        self.harness.run_steps(2);
        self.harness.drag_at(from);
        self.harness.run_steps(2);
        for i in 1..=8 {
            self.harness.hover_at(from + (to - from) * (i as f32 / 8.0));
            self.harness.run_steps(1);
        }
        // Released where it is, with the pointer still there (kittest's drop_at also takes the
        // pointer away, which no real drop does).
        self.button(to, egui::PointerButton::Primary, false, Modifiers::NONE);
        self.harness.run_steps(3);
    }

    /// Steps the app until `done` holds or `limit` passes.
    fn wait_for(&mut self, limit: Duration, mut done: impl FnMut(&FlowlineApp) -> bool) {
        let started = Instant::now();
        while !done(self.app()) {
            assert!(started.elapsed() < limit, "timed out waiting");
            std::thread::sleep(Duration::from_millis(5));
            self.harness.step();
        }
        self.harness.run_steps(2);
    }

    fn run_to_end(&mut self) {
        self.harness
            .key_press_modifiers(Modifiers::COMMAND, Key::Enter);
        self.harness.run_steps(2);
        self.wait_for(Duration::from_secs(60), |app| {
            app.runs
                .queue
                .last()
                .is_some_and(|r| !matches!(r.state, RunState::Waiting | RunState::Running))
        });
    }

    fn drop_file(&mut self, path: &Path) {
        let file = Arc::new(FileOnDisk(path.to_path_buf()));
        self.harness.input_mut().dropped_files.push(file);
        self.harness.run_steps(3);
    }

    /// Whether node `id` shows a widget labelled `param`.
    fn shows(&self, id: &str, param: &str) -> bool {
        let frame = self.node_frame(id);
        self.harness
            .query_all_by_label(param)
            .any(|n| frame.contains_rect(n.rect()))
    }

    /// Clicks the title of node `id` with `modifiers` held.
    fn click_title(&mut self, id: &str, modifiers: Modifiers) {
        let title = self.node_rect(id).left_top() + egui::vec2(30.0, 12.0);
        self.click_at(title, modifiers);
    }

    fn click_at(&mut self, at: Pos2, modifiers: Modifiers) {
        self.harness.hover_at(at);
        self.harness.run_steps(1);
        self.harness.event(egui::Event::ModifiersChanged(modifiers));
        for pressed in [true, false] {
            self.button(at, egui::PointerButton::Primary, pressed, modifiers);
            self.harness.step();
        }
        self.harness
            .event(egui::Event::ModifiersChanged(Modifiers::NONE));
        self.harness.run_steps(2);
    }

    /// The workflow ids of the selected nodes, sorted.
    fn selected(&self) -> Vec<String> {
        let ctx = self.harness.ctx.clone();
        let snarl = &self.app().document().snarl;
        let mut ids: Vec<String> = egui_snarl::ui::get_selected_nodes(Id::new(GRAPH_ID), &ctx)
            .into_iter()
            .map(|node| snarl[node].id.clone())
            .collect();
        ids.sort();
        ids
    }

    fn empty_canvas_point(&self) -> Pos2 {
        let nodes: Vec<Rect> = [
            "model", "prompt", "negative", "start", "cfg", "sampler", "decode", "save",
        ]
        .iter()
        .map(|id| self.node_rect(id))
        .collect();
        let canvas = Rect::from_min_max(egui::pos2(20.0, 60.0), egui::pos2(900.0, 850.0));
        (0..40)
            .flat_map(|i| (0..40).map(move |j| (i, j)))
            .map(|(i, j)| {
                canvas.min + (canvas.size() * egui::vec2(i as f32 / 40.0, j as f32 / 40.0))
            })
            .find(|p| nodes.iter().all(|r| !r.expand(30.0).contains(*p)))
            .expect("some of the canvas is empty")
    }
}

#[test]
fn opens_on_the_default_workflow() {
    let fixture = app(false);
    let graph = fixture.app().document().graph();
    assert!(graph.node("sampler").is_some() && graph.node("save").is_some());
    assert!(!fixture.app().document().is_modified());
    assert_eq!(fixture.app().title(), "untitled — Flowline");
    fixture.harness.get_by_label_contains("▶ Run");
}

#[test]
fn a_node_is_added_by_search_from_the_canvas_menu() {
    let mut fixture = app(false);
    let point = fixture.empty_canvas_point();
    fixture.harness.hover_at(point);
    fixture.harness.run_steps(1);
    fixture.button(point, egui::PointerButton::Secondary, true, Modifiers::NONE);
    fixture.button(
        point,
        egui::PointerButton::Secondary,
        false,
        Modifiers::NONE,
    );
    fixture.harness.run_steps(3);
    fixture.harness.get_by_label("Find").type_text("preview");
    fixture.harness.run_steps(2);
    fixture.harness.key_press(Key::Enter);
    fixture.harness.run_steps(3);
    let graph = fixture.app().document().graph();
    let added = graph
        .nodes
        .iter()
        .find(|n| n.type_name == "preview_image")
        .expect("a Preview Image node was added");
    assert_eq!(added.id, "preview_image");
    assert!(fixture.app().document().is_modified());
    assert!(
        fixture.app().title().contains('•'),
        "the title marks unsaved changes"
    );
}

#[test]
fn a_node_is_added_by_search_after_a_double_click() {
    let mut fixture = app(false);
    let point = fixture.empty_canvas_point();
    fixture.harness.hover_at(point);
    fixture.harness.run_steps(1);
    for _ in 0..2 {
        for pressed in [true, false] {
            fixture.button(
                point,
                egui::PointerButton::Primary,
                pressed,
                Modifiers::NONE,
            );
            fixture.harness.step();
        }
    }
    fixture.harness.run_steps(2);
    fixture.harness.get_by_label("Find").type_text("load image");
    fixture.harness.run_steps(2);
    fixture.harness.key_press(Key::Enter);
    fixture.harness.run_steps(3);
    let graph = fixture.app().document().graph();
    assert!(graph.nodes.iter().any(|n| n.type_name == "load_image"));
}

#[test]
fn wires_connect_matching_ports_and_refuse_others() {
    let mut fixture = app(false);
    let graph = fixture.app().document().graph();
    assert!(graph.link_into("save", "image").is_some());
    // Take the decoded image's wire off Save Image, then draw it again by dragging.
    let save = fixture
        .app()
        .document()
        .node_by_workflow_id("save")
        .unwrap();
    fixture
        .harness
        .state_mut()
        .doc
        .snarl
        .drop_inputs(egui_snarl::InPinId {
            node: save,
            input: 0,
        });
    fixture.harness.run_steps(2);
    assert!(
        fixture
            .app()
            .document()
            .graph()
            .link_into("save", "image")
            .is_none()
    );

    let from = fixture.pin("decode", "image", true);
    let to = fixture.pin("save", "image", false);
    fixture.drag(from, to);
    let link = fixture.app().document().graph();
    let link = link
        .link_into("save", "image")
        .expect("the drag connected the ports");
    assert_eq!(
        (link.from.node.as_str(), link.from.port.as_str()),
        ("decode", "image")
    );

    // A MODEL output does not go into an IMAGE input: while it is dragged the IMAGE pins
    // show they refuse it, and dropping it there connects nothing.
    let from = fixture.pin("model", "model", true);
    fixture.harness.hover_at(from);
    fixture.harness.run_steps(1);
    fixture.harness.drag_at(from);
    fixture.harness.run_steps(1);
    fixture.harness.hover_at(to);
    fixture.harness.run_steps(2);
    assert_eq!(
        fixture.app().wire_drag,
        Some((flowline_engine::graph::PortType::Model, true))
    );
    fixture.button(to, egui::PointerButton::Primary, false, Modifiers::NONE);
    fixture.harness.run_steps(3);
    assert_eq!(fixture.app().wire_drag, None);
    let graph = fixture.app().document().graph();
    assert_eq!(
        graph.link_into("save", "image").unwrap().from.node,
        "decode"
    );
    let notice = fixture.app().notice.clone().unwrap_or_default();
    assert!(
        notice.contains("not connected") && notice.contains("MODEL"),
        "{notice}"
    );
}

#[test]
fn a_wire_dropped_on_the_canvas_offers_the_nodes_that_take_it() {
    let mut fixture = app(false);
    let from = fixture.pin("decode", "image", true);
    let empty = fixture.empty_canvas_point();
    fixture.drag(from, empty);
    // Only nodes with an IMAGE input are offered.
    let offered = |title: &str| {
        fixture
            .harness
            .query_by_role_and_label(egui::accesskit::Role::Button, title)
            .is_some()
    };
    assert!(offered("Preview Image") && offered("Save Image"));
    assert!(!offered("Sampler") && !offered("Load Model"));
    fixture.harness.get_by_label("Find").type_text("preview");
    fixture.harness.run_steps(2);
    fixture.harness.key_press(Key::Enter);
    fixture.harness.run_steps(3);
    let graph = fixture.app().document().graph();
    let link = graph
        .link_into("preview_image", "image")
        .expect("the new node is connected to the wire");
    assert_eq!(link.from.node, "decode");
}

#[test]
fn undo_and_redo_every_edit() {
    let mut fixture = app(false);
    let original = fixture.app().document().graph();
    // Select the sampler by Shift-clicking its title, then delete it.
    fixture.click_title("sampler", Modifiers::SHIFT);
    fixture.harness.key_press(Key::Delete);
    fixture.harness.run_steps(3);
    let deleted = fixture.app().document().graph();
    assert!(
        deleted.node("sampler").is_none(),
        "Delete removes the selected node"
    );

    fixture
        .harness
        .key_press_modifiers(Modifiers::COMMAND, Key::Z);
    fixture.harness.run_steps(3);
    assert_eq!(fixture.app().document().graph(), original);

    fixture
        .harness
        .key_press_modifiers(Modifiers::COMMAND | Modifiers::SHIFT, Key::Z);
    fixture.harness.run_steps(3);
    assert_eq!(fixture.app().document().graph(), deleted);
}

#[test]
fn a_run_streams_its_steps_and_ends_with_the_image() {
    let mut fixture = app(true);
    fixture.run_to_end();
    let app = fixture.app();
    assert_eq!(app.runs.queue.last().unwrap().state, RunState::Finished);
    assert_eq!(app.frames.len(), 16, "every step reached the preview");
    let image = app.runs.image.as_ref().expect("the decoded image is shown");
    let saved = image.path.clone().expect("Save Image wrote a file");
    assert!(saved.starts_with(fixture.dir.path().join("out")));
    assert!(app.runs.trajectory.is_some());
    for node in ["model", "prompt", "sampler", "decode", "save"] {
        assert!(
            matches!(
                app.runs.node_status.get(node),
                Some(super::runs::NodeStatus::Done { .. })
            ),
            "{node}: {:?}",
            app.runs.node_status.get(node)
        );
    }

    // The GPU preview of the last x̂0 is drawn: the default prompt asks for a blue background.
    let rendered = fixture.harness.render().expect("renders with wgpu");
    let label = fixture.harness.get_by_label("predicted final x0").rect();
    let probe = (label.left() + 20.0, label.bottom() + 20.0);
    let pixel = rendered.get_pixel(probe.0 as u32, probe.1 as u32);
    assert!(
        pixel[2] > 150 && pixel[0] < 100,
        "the x̂0 preview shows the blue background, found {pixel:?}"
    );

    // A second run with only the seed changed serves the upstream nodes from the cache.
    fixture.run_to_end();
    let app = fixture.app();
    assert_eq!(
        app.runs.node_status.get("model"),
        Some(&super::runs::NodeStatus::Cached)
    );
}

#[test]
fn sixteen_channel_latents_preview_through_the_shader() {
    // The shipped shapes model has 16 latent channels, like FLUX and SD3.
    let mut fixture = app(true);
    fixture.set_param("model", "family", ParamValue::Text("shapes".into()));
    fixture.run_to_end();
    let app = fixture.app();
    assert_eq!(app.runs.queue.last().unwrap().state, RunState::Finished);
    let last = app.runs.steps.last().unwrap();
    assert_eq!(last.record.clean.dims(), [1, 16, 16, 16]);
    assert_eq!(app.frames.last().unwrap().clean.layers, 4);
    // What the shader draws matches the CPU reference of the same preview map.
    let reference = last.preview.to_rgb(&last.record.clean).unwrap();
    let rendered = fixture.harness.render().expect("renders with wgpu");
    let canvas_label = fixture.harness.get_by_label("canvas x_σ").rect();
    let label = fixture.harness.get_by_label("predicted final x0").rect();
    let spacing = egui::Style::default().spacing.item_spacing;
    let side = label.left() - canvas_label.left() - spacing.x;
    let top_left = egui::pos2(label.left(), label.bottom() + spacing.y);
    for (x, y) in [(2u32, 2u32), (8, 8), (13, 3), (3, 13)] {
        let screen = top_left + egui::vec2(x as f32 + 0.5, y as f32 + 0.5) * side / 16.0;
        let drawn = rendered.get_pixel(screen.x as u32, screen.y as u32);
        let expected = reference.get_pixel(x, y);
        for c in 0..3 {
            assert!(
                (i32::from(drawn[c]) - i32::from(expected[c])).abs() <= 12,
                "latent ({x}, {y}) at {screen:?}: drawn {drawn:?}, expected {expected:?}"
            );
        }
    }
}

#[test]
fn escape_cancels_the_running_run() {
    let mut fixture = app(false);
    fixture.set_param("sampler", "steps", ParamValue::Int(1000));
    fixture
        .harness
        .key_press_modifiers(Modifiers::COMMAND, Key::Enter);
    fixture.harness.run_steps(1);
    fixture.wait_for(Duration::from_secs(60), |app| !app.runs.steps.is_empty());
    fixture.harness.key_press(Key::Escape);
    fixture.harness.run_steps(1);
    fixture.wait_for(Duration::from_secs(60), |app| {
        app.runs.queue.last().unwrap().state == RunState::Cancelled
    });
    assert!(fixture.app().runs.steps.len() < 1000);
    assert!(fixture.app().runs.image.is_none());
}

#[test]
fn a_queued_run_is_cancelled_from_the_queue_list() {
    let mut fixture = app(false);
    fixture.set_param("sampler", "steps", ParamValue::Int(1000));
    for _ in 0..2 {
        fixture
            .harness
            .key_press_modifiers(Modifiers::COMMAND, Key::Enter);
        fixture.harness.run_steps(1);
    }
    fixture.harness.get_by_label("#2 waiting ✖").click();
    fixture.harness.run_steps(1);
    fixture.harness.key_press(Key::Escape);
    fixture.wait_for(Duration::from_secs(60), |app| {
        app.runs.pending().next().is_none()
    });
    let states: Vec<RunState> = fixture
        .app()
        .runs
        .queue
        .iter()
        .map(|r| r.state.clone())
        .collect();
    assert_eq!(states, [RunState::Cancelled, RunState::Cancelled]);
}

#[test]
fn a_broken_workflow_shows_its_error_and_changes_nothing() {
    let mut fixture = app(false);
    let before = fixture.app().document().graph();
    let broken = fixture.dir.path().join("broken.json");
    std::fs::write(&broken, "{\n  \"format\": \"flowline-workflow\",, \n}").unwrap();
    fixture.drop_file(&broken);
    let error = fixture.app().error.clone().expect("an error is shown");
    assert!(
        error.contains("broken.json") && error.contains("line 2"),
        "{error}"
    );
    fixture.harness.get_by_label("Something is wrong");
    assert_eq!(fixture.app().document().graph(), before);
    fixture.harness.get_by_label("OK").click();
    fixture.harness.run_steps(2);
    assert!(fixture.app().error.is_none());
}

#[test]
fn dropping_a_saved_png_brings_its_graph_back() {
    let mut fixture = app(false);
    fixture.set_param(
        "prompt",
        "text",
        ParamValue::Text("a small green circle on a black background".into()),
    );
    let ran = fixture.app().document().graph();
    fixture.run_to_end();
    let png = fixture
        .app()
        .runs
        .image
        .as_ref()
        .unwrap()
        .path
        .clone()
        .unwrap();
    // Start over, then drop the PNG.
    fixture.harness.state_mut().new_document();
    fixture.harness.run_steps(2);
    assert_ne!(fixture.app().document().graph(), ran);
    fixture.drop_file(&png);
    assert_eq!(fixture.app().document().graph(), ran);
}

#[test]
fn save_image_embeds_the_workflow_that_made_it() {
    let mut fixture = app(false);
    fixture.run_to_end();
    let made_by = fixture.app().document().graph();
    // Edit after the run, then save the shown image where the Save Image dialog chose.
    fixture.set_param("sampler", "steps", ParamValue::Int(3));
    let target = fixture.dir.path().join("chosen.png");
    let sender = fixture.app().dialogs.sender.clone();
    sender
        .send(super::files::DialogResult::SaveImage(target.clone()))
        .unwrap();
    fixture.harness.run_steps(2);
    let saved = flowline_engine::workflow::Workflow::from_png(&target).unwrap();
    assert_eq!(saved.graph, made_by);
    let image = image::open(&target).unwrap().to_rgb8();
    assert_eq!(&image, &fixture.app().runs.image.as_ref().unwrap().image);
}

#[test]
fn unsaved_changes_are_not_lost_to_an_open() {
    let mut fixture = app(false);
    fixture.set_param("sampler", "steps", ParamValue::Int(5));
    fixture.harness.run_steps(2);
    let edited = fixture.app().document().graph();
    let other = fixture.dir.path().join("other.json");
    fixture.app().document().workflow().save(&other).unwrap();
    fixture.drop_file(&other);
    fixture.harness.get_by_label("Unsaved changes");
    fixture.harness.get_by_label("Cancel").click();
    fixture.harness.run_steps(2);
    assert_eq!(fixture.app().document().graph(), edited);
    assert!(fixture.app().document().path.is_none());
}

#[test]
fn the_open_graph_is_kept_for_recovery_and_offered_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("recovery.json");
    let mut workflow = flowline_engine::workflow::Workflow::from_json(
        flowline_engine::workflow::DEFAULT_WORKFLOW,
        "default",
    )
    .unwrap();
    workflow
        .apply_assignment("prompt.text=a large yellow heart")
        .unwrap();
    Recovery::at(file.clone()).write(&workflow).unwrap();
    let expected = super::document::Document::new(workflow, None).graph();
    let mut harness = Harness::builder()
        .with_size([1400.0, 900.0])
        .build_eframe(|cc| FlowlineApp::new(cc, None, Recovery::at(file)));
    harness.run_steps(3);
    harness.get_by_label("Restore unsaved work?");
    harness.get_by_label("Restore").click();
    harness.run_steps(3);
    assert_eq!(harness.state().document().graph(), expected);
}

#[test]
fn nodes_show_only_the_parameters_that_apply() {
    let mut fixture = app(false);
    // The embedded model reads a folder and a device, none of FLUX's or SD3.5's files.
    assert!(fixture.shows("model", "path") && fixture.shows("model", "device"));
    for other in ["transformer", "vae", "t5", "precision", "text_encoders"] {
        assert!(!fixture.shows("model", other), "{other} shown for shapes");
    }
    // Rescaled CFG shows its own multiplier, not APG's scales; autoguidance shows because a
    // guide model is connected; the guidance interval is folded away under "more".
    assert!(fixture.shows("cfg", "rescale_multiplier"));
    assert!(fixture.shows("cfg", "autoguide_scale"));
    for other in ["apg_parallel_scale", "apg_norm_threshold", "interval_low"] {
        assert!(!fixture.shows("cfg", other), "{other} shown");
    }
    fixture.set_param("cfg", "rescale_multiplier", ParamValue::Float(0.5));
    fixture.set_param("cfg", "method", ParamValue::Text("apg".into()));
    fixture.set_param("model", "family", ParamValue::Text("exemplar".into()));
    fixture.harness.run_steps(3);
    assert!(
        fixture.shows("cfg", "apg_parallel_scale") && fixture.shows("cfg", "apg_norm_threshold")
    );
    assert!(!fixture.shows("cfg", "rescale_multiplier"));
    assert!(!fixture.shows("model", "path") && !fixture.shows("model", "device"));
    // A hidden value stays in the workflow.
    let cfg = fixture
        .app()
        .document()
        .graph()
        .node("cfg")
        .unwrap()
        .clone();
    assert_eq!(cfg.params["rescale_multiplier"], ParamValue::Float(0.5));
    assert_eq!(cfg.params["interval_low"], ParamValue::Float(0.3));
    // The fold opens on a click.
    let frame = fixture.node_rect("cfg");
    let more = fixture
        .harness
        .get_all_by_label("more")
        .map(|n| fixture.app().transform * n.rect().center())
        .find(|at| frame.contains(*at))
        .expect("the CFG node has a fold");
    fixture.click_at(more, Modifiers::NONE);
    assert!(fixture.shows("cfg", "interval_low") && fixture.shows("cfg", "distilled_guidance"));
}

#[test]
fn a_plain_click_selects_a_node_and_ctrl_or_shift_adds_one() {
    let mut fixture = app(false);
    fixture.click_title("cfg", Modifiers::NONE);
    assert_eq!(fixture.selected(), ["cfg"]);
    fixture.click_title("sampler", Modifiers::NONE);
    assert_eq!(fixture.selected(), ["sampler"]);
    fixture.click_title("decode", Modifiers::SHIFT);
    fixture.click_title("save", Modifiers::COMMAND);
    assert_eq!(fixture.selected(), ["decode", "sampler", "save"]);
    let empty = fixture.empty_canvas_point();
    fixture.click_at(empty, Modifiers::NONE);
    assert!(fixture.selected().is_empty());
}

#[test]
fn node_search_is_fuzzy_and_lists_categories() {
    let found = |query: &str| super::editor::search(query).first().map(|s| s.type_name);
    assert_eq!(found("smplr"), Some("sampler"));
    assert_eq!(found("ldmdl"), Some("load_model"));
    assert_eq!(found("gaus st"), Some("gaussian_start"));
    // Words of a description still find a node, after every name match.
    assert_eq!(found("velocity network"), Some("load_model"));
    assert!(super::editor::search("zzqx").is_empty());

    let mut fixture = app(false);
    let point = fixture.empty_canvas_point();
    for _ in 0..2 {
        fixture.click_at(point, Modifiers::NONE);
    }
    // An empty query lists the types under their categories.
    for category in ["loaders", "sampling"] {
        fixture.harness.get_by_label(category);
    }
    fixture.harness.get_by_label("Find").type_text("prvw");
    fixture.harness.run_steps(2);
    fixture.harness.key_press(Key::Enter);
    fixture.harness.run_steps(3);
    let graph = fixture.app().document().graph();
    assert!(graph.nodes.iter().any(|n| n.type_name == "preview_image"));
}

#[test]
fn the_fit_button_brings_every_node_and_group_into_view() {
    let mut fixture = app(false);
    // A group far from every node.
    let far = Rect::from_min_size(egui::pos2(1600.0, 900.0), egui::vec2(300.0, 200.0));
    fixture.harness.state_mut().doc.ui_state = serde_json::json!({
        "groups": [{"title": "far away", "rect": [far.min.x, far.min.y, far.width(), far.height()]}]
    });
    fixture.harness.state_mut().transform =
        egui::emath::TSTransform::new(egui::vec2(3000.0, -2000.0), 0.4);
    fixture.harness.run_steps(2);
    fixture.harness.get_by_label("⛶ Fit").click();
    fixture.harness.run_steps(3);
    let view = Rect::from_min_size(Pos2::ZERO, egui::vec2(1400.0, 900.0));
    for id in [
        "model", "guide", "prompt", "start", "cfg", "sampler", "decode", "save",
    ] {
        assert!(
            view.contains_rect(fixture.node_rect(id)),
            "{id} is out of view"
        );
    }
    let group = fixture.app().transform * far;
    assert!(view.contains_rect(group), "the group is out of view");
}

#[test]
fn the_sampler_shows_its_own_live_preview() {
    let mut fixture = app(true);
    let before = fixture.node_rect("sampler").height();
    fixture.set_param("sampler", "steps", ParamValue::Int(3));
    fixture.run_to_end();
    assert_eq!(fixture.app().runs.step_node.as_deref(), Some("sampler"));
    let after = fixture.node_rect("sampler").height();
    let side = super::editor::NODE_PREVIEW_SIDE * fixture.app().transform.scaling;
    assert!(
        after >= before + side,
        "the sampler grew from {before} to {after}"
    );
}

impl Fixture {
    /// Where the pin of a pin without a label (a reroute's) on node `id` is on screen.
    fn unlabelled_pin(&self, id: &str, output: bool) -> Pos2 {
        let frame = self.node_frame(id);
        let labels: Vec<Rect> = self
            .harness
            .get_all_by_label("")
            .map(|n| n.rect())
            .filter(|r| frame.contains_rect(*r))
            .collect();
        let x = if output {
            let label = labels.iter().map(|r| r.right()).fold(f32::MIN, f32::max);
            (label + frame.right()) / 2.0
        } else {
            let label = labels.iter().map(|r| r.left()).fold(f32::MAX, f32::min);
            (label + frame.left()) / 2.0
        };
        let y = labels.first().expect("the node has pins").center().y;
        self.app().transform * egui::pos2(x, y)
    }
}

#[test]
fn a_reroute_goes_between_two_nodes_and_carries_their_type() {
    let mut fixture = app(false);
    // Drop Decode's IMAGE wire on the canvas and pick Reroute from the nodes offered.
    let from = fixture.pin("decode", "image", true);
    let empty = fixture.empty_canvas_point();
    fixture.drag(from, empty);
    fixture.harness.get_by_label("Find").type_text("reroute");
    fixture.harness.run_steps(2);
    fixture.harness.key_press(Key::Enter);
    fixture.harness.run_steps(3);
    let graph = fixture.app().document().graph();
    let fed = graph
        .link_into("reroute", "value")
        .expect("the reroute takes the wire");
    assert_eq!(
        (fed.from.node.as_str(), fed.from.port.as_str()),
        ("decode", "image")
    );

    // Its output carries IMAGE now: a MODEL input refuses it.
    let out = fixture.unlabelled_pin("reroute", true);
    fixture.harness.hover_at(out);
    fixture.harness.run_steps(1);
    fixture.harness.drag_at(out);
    fixture.harness.run_steps(1);
    let model_input = fixture.pin("decode", "model", false);
    fixture.harness.hover_at(model_input);
    fixture.harness.run_steps(2);
    assert_eq!(
        fixture.app().wire_drag,
        Some((flowline_engine::graph::PortType::Image, true))
    );
    fixture.button(
        model_input,
        egui::PointerButton::Primary,
        false,
        Modifiers::NONE,
    );
    fixture.harness.run_steps(3);
    let notice = fixture.app().notice.clone().unwrap_or_default();
    assert!(
        notice.contains("not connected") && notice.contains("gives IMAGE"),
        "{notice}"
    );

    // Into Save Image's input it goes, in place of the direct wire.
    let to = fixture.pin("save", "image", false);
    fixture.drag(out, to);
    let graph = fixture.app().document().graph();
    let link = graph.link_into("save", "image").unwrap();
    assert_eq!(
        (link.from.node.as_str(), link.from.port.as_str()),
        ("reroute", "value")
    );
    assert_eq!(
        graph.link_into("decode", "model").unwrap().from.node,
        "model"
    );
    flowline_engine::validate::validate(&graph).expect("the rerouted graph is valid");
}

#[test]
fn a_group_frames_the_selection_moves_its_nodes_and_is_saved_with_the_workflow() {
    let mut fixture = app(false);
    let groups = |fixture: &Fixture| super::groups::groups(&fixture.app().document().ui_state);
    fixture.click_title("decode", Modifiers::NONE);
    fixture.click_title("save", Modifiers::SHIFT);
    assert_eq!(fixture.selected(), ["decode", "save"]);
    fixture
        .harness
        .key_press_modifiers(Modifiers::COMMAND, Key::G);
    fixture.harness.run_steps(3);
    let made = groups(&fixture);
    assert_eq!(made.len(), 1);
    assert_eq!(made[0].title, "Group");
    for id in ["decode", "save"] {
        assert!(
            made[0].frame().contains_rect(fixture.node_frame(id)),
            "{id}"
        );
    }
    assert!(!made[0].frame().intersects(fixture.node_frame("sampler")));
    assert!(fixture.app().document().is_modified());

    // Saved, and opened again after a new document, the group is back.
    let path = fixture.dir.path().join("grouped.json");
    fixture.harness.state_mut().save_to(path.clone());
    let stored: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(stored["ui"]["groups"][0]["title"], "Group");
    fixture.harness.state_mut().new_document();
    fixture.harness.run_steps(2);
    assert!(groups(&fixture).is_empty());
    fixture.drop_file(&path);
    fixture.harness.run_steps(2);
    assert_eq!(groups(&fixture), made);
    assert!(!fixture.app().document().is_modified());

    // Dragging the title bar moves the frame and both nodes by the drag, and nothing else.
    let position = |fixture: &Fixture, id: &str| {
        let node = fixture.app().document().graph().node(id).unwrap().clone();
        egui::vec2(node.position[0], node.position[1])
    };
    let before: Vec<egui::Vec2> = ["decode", "save", "sampler"]
        .iter()
        .map(|id| position(&fixture, id))
        .collect();
    let grip = fixture.app().transform * (made[0].frame().left_top() + egui::vec2(60.0, 12.0));
    let drag = egui::vec2(90.0, 120.0);
    fixture.drag(grip, grip + drag);
    let moved = drag / fixture.app().transform.scaling;
    let near = |a: egui::Vec2, b: egui::Vec2| (a - b).length() < 1.0;
    for (id, start) in ["decode", "save"].iter().zip(&before) {
        let now = position(&fixture, id);
        assert!(near(now, *start + moved), "{id}: {start:?} to {now:?}");
    }
    assert_eq!(position(&fixture, "sampler"), before[2]);
    let dragged = groups(&fixture);
    assert!(near(dragged[0].frame().min - made[0].frame().min, moved));
    assert!(fixture.app().document().is_modified());

    // Undo puts the nodes and the frame back.
    fixture
        .harness
        .key_press_modifiers(Modifiers::COMMAND, Key::Z);
    fixture.harness.run_steps(3);
    for (id, start) in ["decode", "save", "sampler"].iter().zip(&before) {
        assert_eq!(position(&fixture, id), *start, "{id}");
    }
    assert_eq!(groups(&fixture), made);
    assert!(!fixture.app().document().is_modified());
}

#[test]
fn a_group_is_renamed_and_removed_from_its_title_menu() {
    let mut fixture = app(false);
    fixture.click_title("cfg", Modifiers::NONE);
    fixture
        .harness
        .key_press_modifiers(Modifiers::COMMAND, Key::G);
    fixture.harness.run_steps(3);
    let groups = |fixture: &Fixture| super::groups::groups(&fixture.app().document().ui_state);
    let frame = groups(&fixture)[0].frame();
    let grip = fixture.app().transform * (frame.left_top() + egui::vec2(60.0, 12.0));
    let open_menu = |fixture: &mut Fixture| {
        fixture.harness.hover_at(grip);
        fixture.harness.run_steps(1);
        for pressed in [true, false] {
            fixture.button(
                grip,
                egui::PointerButton::Secondary,
                pressed,
                Modifiers::NONE,
            );
        }
        fixture.harness.run_steps(3);
    };
    open_menu(&mut fixture);
    fixture.harness.get_by_label("Rename").click();
    fixture.harness.run_steps(3);
    fixture
        .harness
        .key_press_modifiers(Modifiers::COMMAND, Key::A);
    fixture.harness.event(egui::Event::Text("Guidance".into()));
    fixture.harness.run_steps(1);
    fixture.harness.key_press(Key::Enter);
    fixture.harness.run_steps(3);
    assert_eq!(groups(&fixture)[0].title, "Guidance");
    assert_eq!(groups(&fixture)[0].frame(), frame);

    open_menu(&mut fixture);
    fixture.harness.get_by_label("Remove group").click();
    fixture.harness.run_steps(3);
    assert!(groups(&fixture).is_empty());
    assert!(
        fixture.app().document().graph().node("cfg").is_some(),
        "the nodes stay"
    );
}

#[test]
fn comfyui_workflows_find_their_models_in_the_folder_chosen_for_them() {
    let mut fixture = app(false);
    let models = fixture.dir.path().join("models");
    // A FLUX.1 [dev] transformer as far as its header tells: the tensor only [dev] has.
    let transformer = models.join("unet/flux1-dev.safetensors");
    std::fs::create_dir_all(transformer.parent().unwrap()).unwrap();
    let tensor = candle_core::Tensor::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu);
    let tensors = std::collections::HashMap::from([(
        "guidance_in.in_layer.weight".to_string(),
        tensor.unwrap(),
    )]);
    candle_core::safetensors::save(&tensors, &transformer).unwrap();
    let sender = fixture.app().dialogs.sender.clone();
    sender
        .send(super::files::DialogResult::ComfyuiModels(models.clone()))
        .unwrap();
    fixture.harness.run_steps(2);
    let workflow =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/comfyui/flux-dev.json");
    fixture.drop_file(&workflow);
    let graph = fixture.app().document().graph();
    let model = graph
        .node("model")
        .expect("the loaders became one Load Model node");
    assert_eq!(
        model.params["path"],
        ParamValue::Text(transformer.display().to_string())
    );
    assert_eq!(model.params["family"], ParamValue::Text("flux-dev".into()));
}

#[test]
fn the_step_sweep_example_opens_from_the_menu_and_runs_into_a_contact_sheet() {
    let mut fixture = app(false);
    fixture.harness.get_by_label("File").click();
    fixture.harness.run_steps(2);
    fixture
        .harness
        .get_by_label_contains("Open example")
        .click();
    fixture.harness.run_steps(2);
    fixture
        .harness
        .get_by_label("Step sweep: shapes against shapes-fast")
        .click();
    fixture.harness.run_steps(3);
    let document = fixture.app().document();
    assert_eq!(
        document.path, None,
        "an example opens untitled, so Save asks where"
    );
    let sweep = document
        .node_by_workflow_id("sweep")
        .expect("the sweep node");
    assert_eq!(document.snarl[sweep].type_name, "step_sweep");

    fixture.run_to_end();
    let runs = &fixture.app().runs;
    assert!(matches!(
        runs.queue.last().map(|r| &r.state),
        Some(RunState::Finished)
    ));
    // Five columns of 64² pictures drawn at 128², two rows, with their labels.
    let sheet = &runs.image.as_ref().expect("the sheet is shown").image;
    assert!(
        sheet.width() > 5 * 128 && sheet.height() > 2 * 128,
        "{:?}",
        sheet.dimensions()
    );
}
