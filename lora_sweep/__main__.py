from lora_sweep.cli import main

main()
