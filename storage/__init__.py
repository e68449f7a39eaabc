"""SQLite storage: schema migrations, the repository, retention and backups."""
