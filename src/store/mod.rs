//! SQLite state (`state.db`): open with WAL/busy timeout/foreign keys, numbered forward-only
//! migrations, and read-only compatibility classification for `bangerd --check-migrations`.
