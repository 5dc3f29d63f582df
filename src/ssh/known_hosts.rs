//! wip
pub(crate) fn _x() {}
