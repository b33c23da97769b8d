from trainer.main import console

console()
