from qalign.cli import main

main()
