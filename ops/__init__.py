# Custom tinygrad ops and graph rewrites that model code does not know about (split attention, shortcut compression, ...).
