//! Step previews drawn on the GPU: a latent goes up as a texture and `shaders/latent_preview.wgsl`
//! applies the model's latent→RGB matrix and bias to it inside an egui-wgpu paint callback, so
//! no step is decoded on the CPU.
//!
//! Each preview on screen has a slot (canvas x_σ, predicted x̂0, the sampler node's) holding its
//! textures, uniform buffer and bind groups. A slot handed a latent it has not shown uploads it
//! and bakes the map into an image of one pixel per latent position; every frame then only
//! copies that image to the screen.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use eframe::egui;
use eframe::egui_wgpu::{self, CallbackResources, CallbackTrait, RenderState, wgpu};
use flowline_engine::model::LatentPreview;

/// The most latent channels the shader maps (four RGBA layers).
pub const MAX_CHANNELS: usize = 16;
const MAX_LAYERS: usize = MAX_CHANNELS / 4;

/// A latent ready for upload: channels regrouped four to a texel, and the map to RGB.
pub struct LatentFrame {
    /// Identifies the content; a slot shown the same key again uploads nothing.
    pub key: u64,
    pub width: u32,
    pub height: u32,
    pub layers: u32,
    /// `layers` planes of `height × width` RGBA texels.
    texels: Vec<f32>,
    params: Params,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    matrix: [[f32; 4]; 12],
    bias: [f32; 4],
    size: [u32; 4],
}

impl LatentFrame {
    /// Prepares a `[1, C, h, w]` latent (C ≤ 16) with its preview map.
    pub fn new(key: u64, latent: &Tensor, preview: &LatentPreview) -> anyhow::Result<Self> {
        let latent = latent
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .squeeze(0)?;
        let (channels, height, width) = latent.dims3()?;
        anyhow::ensure!(
            channels <= MAX_CHANNELS,
            "a {channels}-channel latent has no GPU preview (at most {MAX_CHANNELS} channels)"
        );
        let values = latent.flatten_all()?.to_vec1::<f32>()?;
        let layers = channels.div_ceil(4);
        let plane = height * width;
        let mut texels = vec![0f32; layers * plane * 4];
        for (channel, values) in values.chunks(plane).enumerate() {
            let (layer, lane) = (channel / 4, channel % 4);
            for (position, value) in values.iter().enumerate() {
                texels[(layer * plane + position) * 4 + lane] = *value;
            }
        }
        let mut matrix = [[0f32; 4]; 12];
        for (row, weights) in preview.matrix.iter().enumerate() {
            for (channel, weight) in weights.iter().take(channels).enumerate() {
                matrix[row * MAX_LAYERS + channel / 4][channel % 4] = *weight;
            }
        }
        let [r, g, b] = preview.bias;
        Ok(LatentFrame {
            key,
            width: width as u32,
            height: height as u32,
            layers: layers as u32,
            texels,
            params: Params {
                matrix,
                bias: [r, g, b, 0.0],
                size: [width as u32, height as u32, layers as u32, 0],
            },
        })
    }
}

/// The two pipelines, kept in egui-wgpu's callback resources for the app's lifetime.
struct Pipeline {
    /// Maps a latent to its baked image, once per new step.
    bake: wgpu::RenderPipeline,
    /// Copies a baked image to the screen, every frame.
    show: wgpu::RenderPipeline,
    latent_layout: wgpu::BindGroupLayout,
    baked_layout: wgpu::BindGroupLayout,
    /// The baked images' format: sRGB exactly when the render target's is, so that showing
    /// one is a plain copy.
    baked_format: wgpu::TextureFormat,
    slots: HashMap<u32, Slot>,
}

struct Slot {
    key: u64,
    extent: (u32, u32, u32),
    latent: wgpu::Texture,
    uniforms: wgpu::Buffer,
    latent_bind_group: wgpu::BindGroup,
    baked: wgpu::TextureView,
    baked_bind_group: wgpu::BindGroup,
}

/// Builds the pipelines once, at start-up.
pub fn install(render_state: &RenderState) {
    let device = &render_state.device;
    let shader = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("latent_preview"),
        source: wgpu::ShaderSource::Wgsl(
            include_str!("../../../shaders/latent_preview.wgsl").into(),
        ),
    });
    let fragment_texture = |binding, view_dimension| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::FRAGMENT,
        ty: wgpu::BindingType::Texture {
            sample_type: wgpu::TextureSampleType::Float { filterable: false },
            view_dimension,
            multisampled: false,
        },
        count: None,
    };
    let latent_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some("latent_preview latent"),
        entries: &[
            fragment_texture(0, wgpu::TextureViewDimension::D2Array),
            wgpu::BindGroupLayoutEntry {
                binding: 1,
                visibility: wgpu::ShaderStages::FRAGMENT,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            },
        ],
    });
    let baked_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some("latent_preview baked"),
        entries: &[fragment_texture(0, wgpu::TextureViewDimension::D2)],
    });
    let target_format = render_state.target_format;
    let baked_format = if target_format.is_srgb() {
        wgpu::TextureFormat::Rgba8UnormSrgb
    } else {
        wgpu::TextureFormat::Rgba8Unorm
    };
    let pipeline = |name, layouts: &[Option<&wgpu::BindGroupLayout>], entry, format| {
        let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(name),
            bind_group_layouts: layouts,
            immediate_size: 0,
        });
        device.create_render_pipeline(&wgpu::RenderPipelineDescriptor {
            label: Some(name),
            layout: Some(&layout),
            vertex: wgpu::VertexState {
                module: &shader,
                entry_point: Some("vs_main"),
                compilation_options: Default::default(),
                buffers: &[],
            },
            primitive: wgpu::PrimitiveState::default(),
            depth_stencil: None,
            multisample: wgpu::MultisampleState::default(),
            fragment: Some(wgpu::FragmentState {
                module: &shader,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                targets: &[Some(wgpu::TextureFormat::into(format))],
            }),
            multiview_mask: None,
            cache: None,
        })
    };
    let bake = pipeline(
        "latent_preview bake",
        &[Some(&latent_layout)],
        "fs_bake",
        baked_format,
    );
    let show = pipeline(
        "latent_preview show",
        &[None, Some(&baked_layout)],
        "fs_show",
        target_format,
    );
    render_state
        .renderer
        .write()
        .callback_resources
        .insert(Pipeline {
            bake,
            show,
            latent_layout,
            baked_layout,
            baked_format,
            slots: HashMap::new(),
        });
}

/// The slot of the small preview a sampler node shows on the canvas (the preview panel's
/// canvas and predicted image use 0 and 1).
pub const NODE_SLOT: u32 = 2;

/// A paint callback drawing `frame` in slot `slot`.
struct DrawLatent {
    slot: u32,
    frame: Arc<LatentFrame>,
}

impl CallbackTrait for DrawLatent {
    /// Uploads and bakes a latent the slot has not shown yet.
    fn prepare(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        _screen: &egui_wgpu::ScreenDescriptor,
        encoder: &mut wgpu::CommandEncoder,
        resources: &mut CallbackResources,
    ) -> Vec<wgpu::CommandBuffer> {
        let Some(pipeline) = resources.get_mut::<Pipeline>() else {
            return Vec::new();
        };
        let frame = &self.frame;
        let extent = (frame.width, frame.height, frame.layers);
        let needs_textures = pipeline
            .slots
            .get(&self.slot)
            .is_none_or(|slot| slot.extent != extent);
        if needs_textures {
            let slot = new_slot(device, pipeline, extent);
            pipeline.slots.insert(self.slot, slot);
        }
        let slot = pipeline.slots.get_mut(&self.slot).expect("just made");
        if slot.key == frame.key {
            return Vec::new();
        }
        queue.write_texture(
            wgpu::TexelCopyTextureInfo {
                texture: &slot.latent,
                mip_level: 0,
                origin: wgpu::Origin3d::ZERO,
                aspect: wgpu::TextureAspect::All,
            },
            bytemuck::cast_slice(&frame.texels),
            wgpu::TexelCopyBufferLayout {
                offset: 0,
                bytes_per_row: Some(frame.width * 16),
                rows_per_image: Some(frame.height),
            },
            wgpu::Extent3d {
                width: frame.width,
                height: frame.height,
                depth_or_array_layers: frame.layers,
            },
        );
        let mut params = frame.params;
        params.size[3] = u32::from(pipeline.baked_format.is_srgb());
        queue.write_buffer(&slot.uniforms, 0, bytemuck::bytes_of(&params));
        let mut pass = encoder.begin_render_pass(&wgpu::RenderPassDescriptor {
            label: Some("latent_preview bake"),
            color_attachments: &[Some(wgpu::RenderPassColorAttachment {
                view: &slot.baked,
                depth_slice: None,
                resolve_target: None,
                ops: wgpu::Operations {
                    load: wgpu::LoadOp::Clear(wgpu::Color::BLACK),
                    store: wgpu::StoreOp::Store,
                },
            })],
            depth_stencil_attachment: None,
            timestamp_writes: None,
            occlusion_query_set: None,
            multiview_mask: None,
        });
        pass.set_pipeline(&pipeline.bake);
        pass.set_bind_group(0, &slot.latent_bind_group, &[]);
        pass.draw(0..3, 0..1);
        slot.key = frame.key;
        Vec::new()
    }

    fn paint(
        &self,
        _info: egui::PaintCallbackInfo,
        render_pass: &mut wgpu::RenderPass<'static>,
        resources: &CallbackResources,
    ) {
        let Some(pipeline) = resources.get::<Pipeline>() else {
            return;
        };
        let Some(slot) = pipeline.slots.get(&self.slot) else {
            return;
        };
        render_pass.set_pipeline(&pipeline.show);
        render_pass.set_bind_group(1, &slot.baked_bind_group, &[]);
        render_pass.draw(0..3, 0..1);
    }
}

/// A slot's textures for latents of `extent` (width, height, layers): the latent itself, its
/// map's parameters and the baked image.
fn new_slot(device: &wgpu::Device, pipeline: &Pipeline, extent: (u32, u32, u32)) -> Slot {
    let (width, height, layers) = extent;
    let texture = |label, layers, format, usage| {
        device.create_texture(&wgpu::TextureDescriptor {
            label: Some(label),
            size: wgpu::Extent3d {
                width,
                height,
                depth_or_array_layers: layers,
            },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format,
            usage: wgpu::TextureUsages::TEXTURE_BINDING | usage,
            view_formats: &[],
        })
    };
    let latent = texture(
        "latent",
        layers,
        wgpu::TextureFormat::Rgba32Float,
        wgpu::TextureUsages::COPY_DST,
    );
    let latent_view = latent.create_view(&wgpu::TextureViewDescriptor {
        dimension: Some(wgpu::TextureViewDimension::D2Array),
        ..Default::default()
    });
    let uniforms = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("latent_preview params"),
        size: std::mem::size_of::<Params>() as u64,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let latent_bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("latent_preview latent"),
        layout: &pipeline.latent_layout,
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::TextureView(&latent_view),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: uniforms.as_entire_binding(),
            },
        ],
    });
    let baked = texture(
        "latent baked",
        1,
        pipeline.baked_format,
        wgpu::TextureUsages::RENDER_ATTACHMENT,
    )
    .create_view(&wgpu::TextureViewDescriptor::default());
    let baked_bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("latent_preview baked"),
        layout: &pipeline.baked_layout,
        entries: &[wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::TextureView(&baked),
        }],
    });
    Slot {
        key: u64::MAX,
        extent,
        latent,
        uniforms,
        latent_bind_group,
        baked,
        baked_bind_group,
    }
}

/// Draws `frame` into a `size` rectangle (keeping the latent's aspect) and returns its response.
pub fn show(ui: &mut egui::Ui, slot: u32, frame: &Arc<LatentFrame>, side: f32) -> egui::Response {
    let aspect = frame.height as f32 / frame.width.max(1) as f32;
    let (rect, response) =
        ui.allocate_exact_size(egui::vec2(side, side * aspect), egui::Sense::hover());
    ui.painter().add(egui_wgpu::Callback::new_paint_callback(
        rect,
        DrawLatent {
            slot,
            frame: frame.clone(),
        },
    ));
    response
}

/// What the preview shows for one step.
pub(crate) struct StepFrames {
    pub canvas: Arc<LatentFrame>,
    pub clean: Arc<LatentFrame>,
}

/// How many latent values the σ plot follows.
const PROBES: usize = 6;

/// A few latent values at fixed, spread-out positions, for the σ plot.
pub(crate) fn probe_values(latent: &candle_core::Tensor) -> Vec<f32> {
    let values = latent
        .flatten_all()
        .and_then(|t| t.to_dtype(candle_core::DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .unwrap_or_default();
    if values.is_empty() {
        return Vec::new();
    }
    (0..PROBES)
        .map(|i| values[(i * 7919 + 13) % values.len()])
        .collect()
}
