"""Private implementation of jdeq; import the public names from :mod:`jdeq`."""
