//! The error kinds that every layer shares.
//!
//! They live at the bottom of the engine so that models, nodes and front ends can all raise
//! and recognise them without importing one another.

/// A failure caused by what the user gave (a file, a parameter, a prompt) rather than by the
/// program: the command line exits 2 for these, 1 for other failures.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

/// Returns early with an [`InputError`].
#[macro_export]
macro_rules! input_error {
    ($($arg:tt)*) => {
        return Err($crate::error::InputError(format!($($arg)*)).into())
    };
}
