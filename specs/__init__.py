"""The contracts of evictkit: the pluggy hook specification (hookspecs) and, later, the laws."""
