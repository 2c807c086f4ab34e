//! The shapes networks' building blocks, written for the speed of candle's CPU backward pass.
//!
//! The shapes model is trained on the CPU, where candle's automatic gradients have two slow
//! paths that the obvious code falls into: the gradient of anything broadcast (a bias added to
//! every token, a kernel weighting every shifted copy) is a sum over a leading or middle axis,
//! which candle adds up one element at a time; and the input gradient of a convolution is a
//! transposed convolution, which candle works out one short dot product at a time. Each block
//! here gets the same result through matrix products and plain convolutions instead, and keeps
//! its weights named and shaped as candle-nn's layers keep them, so model files are unchanged.

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor};
use candle_nn::{Init, VarBuilder};

/// How candle-nn's `linear` and `conv2d` initialise the weight and the bias of a layer with
/// `inputs` input channels, so a new run starts as it did with those layers.
fn candle_nn_initialisation(inputs: usize) -> (Init, Init) {
    let bound = 1.0 / (inputs as f64).sqrt();
    (
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )
}

/// A fully connected layer, `x·Wᵀ + b` over the last axis, with its weights named and shaped
/// as candle-nn's `Linear` keeps them (`weight` `[outputs, inputs]`, `bias` `[outputs]`).
///
/// The bias enters the matrix product as one more input column that is always 1, instead of
/// being added afterwards: candle works out the gradient of a bias added to every row by
/// summing the rows one element at a time, which in training cost more than the product
/// itself. Inside the product, that sum is part of the matrix multiplication.
pub(super) struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Dense {
    /// Initialised as candle-nn's `linear` initialises a layer.
    pub(super) fn new(inputs: usize, outputs: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let (weight_init, bias_init) = candle_nn_initialisation(inputs);
        Ok(Dense {
            weight: vb.get_with_hints((outputs, inputs), "weight", weight_init)?,
            bias: vb.get_with_hints(outputs, "bias", bias_init)?,
        })
    }

    /// A layer whose weights start at zero (adaLN-Zero and the output projection).
    pub(super) fn zero(inputs: usize, outputs: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Dense {
            weight: vb.get_with_hints((outputs, inputs), "weight", Init::Const(0.0))?,
            bias: vb.get_with_hints(outputs, "bias", Init::Const(0.0))?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut shape = x.dims().to_vec();
        let inputs = shape.pop().unwrap_or(1);
        let rows = shape.iter().product::<usize>();
        let ones = Tensor::ones((rows, 1), x.dtype(), x.device())?;
        let augmented = Tensor::cat(&[&x.reshape((rows, inputs))?, &ones], 1)?;
        let weight = Tensor::cat(&[&self.weight, &self.bias.unsqueeze(1)?], 1)?;
        shape.push(self.weight.dim(0)?);
        augmented.matmul(&weight.t()?)?.reshape(shape)
    }
}

/// `[B, D]` to `[B, count, D]`, each row repeated `count` times, as the product with a column
/// of ones: its gradient is then a matrix product too, where a broadcast's is the slow sum
/// that [`Dense`] avoids.
pub(super) fn repeat_rows(t: &Tensor, count: usize) -> candle_core::Result<Tensor> {
    let ones = Tensor::ones((t.dim(0)?, count, 1), t.dtype(), t.device())?;
    ones.matmul(&t.unsqueeze(1)?)
}

/// A 3×3 depthwise convolution over the image tokens' grid, with zero padding at the border.
///
/// Written as matrix products only: the kernel turns the nine fixed shift matrices of the grid
/// into one `[tokens, tokens]` matrix per channel, and each channel's tokens are multiplied by
/// its matrix. On the CPU that is about ten times faster, forward and backward, than shifting
/// every channel nine times and summing the weighted copies: candle sums over a middle axis one
/// element at a time, and the gradient of a broadcast kernel is such a sum.
pub(super) struct LocalMixing {
    /// `[channels, 9, 1]`, the kernel of each channel in row-major order.
    kernel: Tensor,
    bias: Tensor,
    /// `[9, tokens·tokens]`: row `tap` is the matrix whose entry `(from, to)` is 1 where that
    /// tap reads token `from` for token `to`.
    shifts: Tensor,
}

impl LocalMixing {
    pub(super) fn new(channels: usize, side: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let tokens = side * side;
        let mut shifts = vec![0f32; 9 * tokens * tokens];
        for tap in 0..9 {
            let (dy, dx) = ((tap / 3) as isize - 1, (tap % 3) as isize - 1);
            for y in 0..side as isize {
                for x in 0..side as isize {
                    let (from_y, from_x) = (y + dy, x + dx);
                    let inside = (0..side as isize).contains(&from_y)
                        && (0..side as isize).contains(&from_x);
                    if inside {
                        let from = (from_y * side as isize + from_x) as usize;
                        let to = (y * side as isize + x) as usize;
                        shifts[(tap * tokens + from) * tokens + to] = 1.0;
                    }
                }
            }
        }
        Ok(LocalMixing {
            kernel: vb.get_with_hints((channels, 9, 1), "weight", Init::Const(0.0))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
            shifts: Tensor::from_vec(shifts, (9, tokens * tokens), vb.device())?,
        })
    }

    /// `[B, tokens, C]` row-major grid tokens to the same shape.
    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, tokens, channels) = x.dims3()?;
        let per_channel = self
            .kernel
            .reshape((channels, 9))?
            .matmul(&self.shifts)?
            .reshape((channels, tokens, tokens))?;
        x.permute((2, 0, 1))?
            .contiguous()?
            .matmul(&per_channel)?
            .permute((1, 2, 0))?
            .broadcast_add(&self.bias)
    }
}

/// A 3×3 convolution with zero padding that keeps the side, its weights named and shaped as
/// candle-nn's `Conv2d` keeps them (`weight` `[outputs, inputs, 3, 3]`, `bias` `[outputs]`).
pub(super) struct Conv3x3 {
    weight: Tensor,
    bias: Tensor,
}

impl Conv3x3 {
    /// Initialised as candle-nn's `conv2d` initialises a layer, or all to `init`.
    pub(super) fn new(
        inputs: usize,
        outputs: usize,
        init: Option<Init>,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let (weight_init, bias_init) = match init {
            None => candle_nn_initialisation(inputs),
            Some(init) => (init, init),
        };
        Ok(Conv3x3 {
            weight: vb.get_with_hints((outputs, inputs, 3, 3), "weight", weight_init)?,
            bias: vb.get_with_hints(outputs, "bias", bias_init)?,
        })
    }

    /// `[B, inputs, H, W]` to `[B, outputs, H, W]`.
    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let convolved = match (x.device(), x.dtype()) {
            (Device::Cpu, DType::F32) => x
                .contiguous()?
                .apply_op2(&self.weight.contiguous()?, SamePaddingConvolution)?,
            _ => x.conv2d(&self.weight, 1, 1, 1, 1)?,
        };
        convolved.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

/// candle's own 3×3 same-padding convolution of contiguous f32 tensors, with the input
/// gradient worked out as the convolution of the output gradient with the flipped, transposed
/// kernel, which gives the same as candle's transposed convolution in less than half the time.
struct SamePaddingConvolution;

/// A contiguous f32 tensor's values as a new tensor on the CPU.
fn cpu_tensor(storage: &CpuStorage, layout: &Layout) -> candle_core::Result<Tensor> {
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("the 3×3 convolution takes contiguous tensors only".into())
    })?;
    Tensor::from_slice(
        &storage.as_slice::<f32>()?[start..end],
        layout.shape(),
        &Device::Cpu,
    )
}

impl CustomOp2 for SamePaddingConvolution {
    fn name(&self) -> &'static str {
        "same-padding-conv3x3"
    }

    fn cpu_fwd(
        &self,
        input: &CpuStorage,
        input_layout: &Layout,
        kernel: &CpuStorage,
        kernel_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let output = cpu_tensor(input, input_layout)?.conv2d(
            &cpu_tensor(kernel, kernel_layout)?,
            1,
            1,
            1,
            1,
        )?;
        let shape = output.shape().clone();
        Ok((CpuStorage::F32(output.flatten_all()?.to_vec1()?), shape))
    }

    fn bwd(
        &self,
        input: &Tensor,
        kernel: &Tensor,
        _output: &Tensor,
        output_gradient: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let flipped = kernel.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
        let input_gradient = output_gradient.conv2d(&flipped, 1, 1, 1, 1)?;
        let kernel_gradient = input
            .transpose(0, 1)?
            .conv2d(&output_gradient.transpose(0, 1)?, 1, 1, 1, 1)?
            .transpose(0, 1)?;
        Ok((Some(input_gradient), Some(kernel_gradient)))
    }
}

/// The largest absolute difference between two tensors of the same shape (for tests).
#[cfg(test)]
pub(crate) fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::max_difference;
    use flowline_engine::flow::noise::gaussian;

    #[test]
    fn local_mixing_is_a_zero_padded_depthwise_convolution() {
        let device = Device::Cpu;
        let (batch, side, channels) = (2, 4, 3);
        let varmap = candle_nn::VarMap::new();
        let mut local = LocalMixing::new(
            channels,
            side,
            VarBuilder::from_varmap(&varmap, DType::F32, &device),
        )
        .unwrap();
        local.kernel = gaussian(1, (channels, 9, 1), &device).unwrap();
        local.bias = gaussian(2, channels, &device).unwrap();
        let grid = gaussian(3, (batch, channels, side, side), &device).unwrap();
        let tokens = grid
            .flatten_from(2)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();

        let mixed = local.forward(&tokens).unwrap();
        let reference = grid
            .conv2d(
                &local.kernel.reshape((channels, 1, 3, 3)).unwrap(),
                1,
                1,
                1,
                channels,
            )
            .unwrap()
            .broadcast_add(&local.bias.reshape((1, channels, 1, 1)).unwrap())
            .unwrap()
            .flatten_from(2)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let difference = max_difference(&mixed, &reference);
        assert!(difference < 1e-5, "differs by {difference}");
    }

    #[test]
    fn the_dense_layer_and_its_gradients_are_candles_linear() {
        let device = Device::Cpu;
        let varmap = candle_nn::VarMap::new();
        let dense =
            Dense::new(5, 3, VarBuilder::from_varmap(&varmap, DType::F32, &device)).unwrap();
        let input =
            candle_core::Var::from_tensor(&gaussian(8, (2, 4, 5), &device).unwrap()).unwrap();
        let weight = candle_core::Var::from_tensor(&dense.weight).unwrap();
        let bias = candle_core::Var::from_tensor(&gaussian(9, 3, &device).unwrap()).unwrap();
        let ours = Dense {
            weight: weight.as_tensor().clone(),
            bias: bias.as_tensor().clone(),
        };
        let theirs =
            candle_nn::Linear::new(weight.as_tensor().clone(), Some(bias.as_tensor().clone()));
        let target = gaussian(10, (2, 4, 3), &device).unwrap();
        let loss = |output: Tensor| (output * &target).unwrap().sum_all().unwrap();

        let our_output = ours.forward(input.as_tensor()).unwrap();
        let their_output = candle_nn::Module::forward(&theirs, input.as_tensor()).unwrap();
        assert!(max_difference(&our_output, &their_output) < 1e-5);
        let our_gradients = loss(our_output).backward().unwrap();
        let their_gradients = loss(their_output).backward().unwrap();
        for var in [&input, &weight, &bias] {
            let difference = max_difference(
                our_gradients.get(var.as_tensor()).unwrap(),
                their_gradients.get(var.as_tensor()).unwrap(),
            );
            assert!(difference < 1e-5, "gradients differ by {difference}");
        }
    }

    #[test]
    fn the_convolution_and_its_gradients_are_candles() {
        let device = Device::Cpu;
        let varmap = candle_nn::VarMap::new();
        let conv = Conv3x3::new(
            3,
            4,
            None,
            VarBuilder::from_varmap(&varmap, DType::F32, &device),
        )
        .unwrap();
        let input =
            candle_core::Var::from_tensor(&gaussian(6, (2, 3, 5, 5), &device).unwrap()).unwrap();
        let weight = candle_core::Var::from_tensor(&conv.weight).unwrap();
        let fast = Conv3x3 {
            weight: weight.as_tensor().clone(),
            bias: conv.bias.clone(),
        };
        let target = gaussian(7, (2, 4, 5, 5), &device).unwrap();
        let loss = |output: Tensor| (output * &target).unwrap().sum_all().unwrap();

        let ours = fast.forward(input.as_tensor()).unwrap();
        let theirs = input
            .as_tensor()
            .conv2d(weight.as_tensor(), 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&conv.bias.reshape((1, 4, 1, 1)).unwrap())
            .unwrap();
        assert!(max_difference(&ours, &theirs) < 1e-5);
        let our_gradients = loss(ours).backward().unwrap();
        let their_gradients = loss(theirs).backward().unwrap();
        for var in [&input, &weight] {
            let difference = max_difference(
                our_gradients.get(var.as_tensor()).unwrap(),
                their_gradients.get(var.as_tensor()).unwrap(),
            );
            assert!(difference < 1e-4, "gradients differ by {difference}");
        }
    }
}
