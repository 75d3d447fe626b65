"""Where models come from: discovery only. Loading belongs to `multiserve.lifecycle`."""
