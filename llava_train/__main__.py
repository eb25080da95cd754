import sys

from llava_train.cli import main

if __name__ == "__main__":
    sys.exit(main())  # the exit code matters: launchers and sbatch read it (EXIT_PREEMPTED)
