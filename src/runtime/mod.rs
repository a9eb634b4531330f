//! Executes an IR graph on the CPU.
