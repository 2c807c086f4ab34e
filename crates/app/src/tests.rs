//! The app driven as a user drives it, through egui_kittest: clicks, drags, keys and dropped
//! files go in as input events, and what the app then holds and draws is checked.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eframe::egui::{self, Key, Modifiers, Pos2, Rect};
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use flowline_engine::graph::ParamValue;

use super::FlowlineApp;
use super::files::Recovery;
use super::runs::RunState;

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
    let header = fixture.node_rect("sampler").left_top() + egui::vec2(30.0, 12.0);
    fixture.harness.hover_at(header);
    fixture.harness.run_steps(1);
    fixture
        .harness
        .event(egui::Event::ModifiersChanged(Modifiers::SHIFT));
    for pressed in [true, false] {
        fixture.button(
            header,
            egui::PointerButton::Primary,
            pressed,
            Modifiers::SHIFT,
        );
        fixture.harness.step();
    }
    fixture
        .harness
        .event(egui::Event::ModifiersChanged(Modifiers::NONE));
    fixture.harness.run_steps(2);
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
