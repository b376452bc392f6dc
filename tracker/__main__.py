import sys
import warnings

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while the libraries load: nothing has started
    print("interrupted (SIGINT): nothing was written", file=sys.stderr)
    sys.exit(130)

# The commands print their own warning about untrained weights; Python's would repeat it.
warnings.filterwarnings("ignore", message="UNTRAINED WEIGHTS")
sys.exit(main())
