from trainer.errors import exit_process
from trainer.main import main

exit_process(main())
