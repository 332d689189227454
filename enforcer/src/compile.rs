//! Compiles a validated `Policy` into kernel table entries. Pure.
