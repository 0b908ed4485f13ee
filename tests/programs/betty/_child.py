import betty
from betty.engine import Engine

print(betty.__name__, Engine.__module__)
