// Latent → RGB preview: one linear map per latent position, done on the GPU in two passes.
//
// `fs_bake` runs once per new step, into an RGBA8 image with one pixel per latent position.
// The latent arrives as a 2-D texture array of RGBA32F layers, four latent channels per
// layer (up to 16 channels, as FLUX, SD3 and Flowline's own model have). Each pixel reads
// its latent position and applies the model's preview matrix and bias:
//     rgb = bias + Σ_layer matrix[row][layer] · texel(layer)
// The result is sRGB in [0, 1]; for an sRGB image it is linearised first, because the
// hardware encodes it again on write.
//
// `fs_show` runs every frame and only copies the baked pixel under each screen pixel, so a
// frame costs one texel read per pixel rather than the whole map (on a software renderer the
// map cost more than the rest of the window).

struct Params {
    // matrix[row * 4 + layer]: the weights of output row (R, G, B) for the layer's channels.
    matrix: array<vec4<f32>, 12>,
    bias: vec4<f32>,
    // x: width, y: height, z: layers, w: 1 when the baked image is sRGB.
    size: vec4<u32>,
};

@group(0) @binding(0) var latent: texture_2d_array<f32>;
@group(0) @binding(1) var<uniform> params: Params;
@group(1) @binding(0) var baked: texture_2d<f32>;

struct VertexOut {
    @builtin(position) position: vec4<f32>,
    @location(0) uv: vec2<f32>,
};

// One triangle that covers the viewport: the baked image, or the rectangle egui sets for the
// widget.
@vertex
fn vs_main(@builtin(vertex_index) index: u32) -> VertexOut {
    let uv = vec2<f32>(f32((index << 1u) & 2u), f32(index & 2u));
    var out: VertexOut;
    out.position = vec4<f32>(uv.x * 2.0 - 1.0, 1.0 - uv.y * 2.0, 0.0, 1.0);
    out.uv = uv;
    return out;
}

fn srgb_to_linear(c: vec3<f32>) -> vec3<f32> {
    let low = c / 12.92;
    let high = pow((c + 0.055) / 1.055, vec3<f32>(2.4));
    return select(high, low, c <= vec3<f32>(0.04045));
}

// The texel of a `size` image under `uv` (nearest: each latent position stays a crisp block).
fn texel_at(uv: vec2<f32>, size: vec2<i32>) -> vec2<i32> {
    return clamp(vec2<i32>(floor(uv * vec2<f32>(size))), vec2<i32>(0), size - 1);
}

@fragment
fn fs_bake(in: VertexOut) -> @location(0) vec4<f32> {
    let texel = texel_at(in.uv, vec2<i32>(i32(params.size.x), i32(params.size.y)));
    var rgb = params.bias.xyz;
    for (var layer = 0u; layer < params.size.z; layer = layer + 1u) {
        let v = textureLoad(latent, texel, i32(layer), 0);
        rgb = rgb + vec3<f32>(
            dot(params.matrix[layer], v),
            dot(params.matrix[4u + layer], v),
            dot(params.matrix[8u + layer], v),
        );
    }
    rgb = clamp(rgb, vec3<f32>(0.0), vec3<f32>(1.0));
    if (params.size.w == 1u) {
        rgb = srgb_to_linear(rgb);
    }
    return vec4<f32>(rgb, 1.0);
}

@fragment
fn fs_show(in: VertexOut) -> @location(0) vec4<f32> {
    return textureLoad(baked, texel_at(in.uv, vec2<i32>(textureDimensions(baked))), 0);
}
