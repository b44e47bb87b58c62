"""ThunderServe component."""
