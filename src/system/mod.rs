//! The installed system: install.toml, systemd units, service control, install/uninstall, doctor.
