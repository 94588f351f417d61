"""Small shared helpers with no dependency beyond the standard library."""
