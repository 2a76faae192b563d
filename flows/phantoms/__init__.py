"""flows/phantoms."""
