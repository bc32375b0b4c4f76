//! Who may put code into warden: plugin files and their directories pass the StrictModes
//! check of [`warden_plugin_api::sdk::trust`] (not writable by group or others, owned by
//! root or warden's own user, every directory up to `/` likewise), unless
//! `--allow-insecure-plugins` says otherwise for development.

use std::path::Path;

use warden_plugin_api::sdk::trust;

/// Checks a plugin file, its directory entry, any symlink target and every directory up;
/// the error says what is wrong ([`super::LoadError::Permissions`] adds what to do).
pub fn check_plugin_file(path: &Path) -> Result<(), String> {
    trust::check_file(path)
}

/// Checks a plugin directory and every directory above it.
pub fn check_plugin_dir(dir: &Path) -> Result<(), String> {
    trust::check_dir(dir)
}
