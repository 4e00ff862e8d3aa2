"""HTTP surfaces, one blueprint per module; routes stay thin and call the services in `common`."""
