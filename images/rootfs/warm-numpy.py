# forkd-agent's warm-up recipe for the lab rootfs: imports done here run
# once at boot, and every child of a snapshot inherits them.
import numpy  # noqa: F401
