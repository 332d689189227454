//! Validates a policy: YAML in, `Policy` out. Pure: no kernel, no root.
