"""The GAN algorithm in plain torch: architectures, losses, penalties, the step's phases, EMA and
the double-backward ops. Never imports deepspeed, ray or mlflow."""
