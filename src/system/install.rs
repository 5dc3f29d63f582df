//! Install, uninstall and status of banger on this host.
