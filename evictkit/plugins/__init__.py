"""The built-in policies, one module each, registered through the `evictkit` entry-point group."""
