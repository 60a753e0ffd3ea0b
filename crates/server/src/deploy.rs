//! Deploying agent versions.
