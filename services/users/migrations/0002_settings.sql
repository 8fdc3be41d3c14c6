-- Settings the service makes for itself once and every replica shares, such as the key that
-- MACs ListUsers page tokens (hex). Portable SQL.
CREATE TABLE service_settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
