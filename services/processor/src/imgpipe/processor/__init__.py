"""imgpipe processor: downloads, compresses and stores each image of a request."""
