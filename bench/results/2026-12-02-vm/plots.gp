# kv-bench sweep plots; run `gnuplot plots.gp` in this folder to redo them.
# Data: plots.dat (x: MB, y: decode tok/s, bound ratio; label: weights %; the same figures as sweep.csv).
if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) {
  set terminal pngcairo size 1000,620 font ',10'
} else {
  set terminal png size 1000,620
}
set grid
set key outside right top
set xlabel 'DRAM footprint: peak bytes of the registry, MB'
set xrange [0:*]

set output 'tps_vs_footprint.png'
set title '110M: decode tokens/s against DRAM footprint (labels: % of the weights resident)'
set ylabel 'decode tokens/s (all sequences)'
set logscale y
set yrange [*:*]
plot 'plots.dat' index 0 using 1:2 with linespoints lw 2 pt 7 lc 1 dt 1 title 'batch 1, KV f32', \
     'plots.dat' index 0 using 1:2:(sprintf('%d%%', int($4))) with labels offset 0,0.9 font ',8' notitle, \
     'plots.dat' index 1 using 1:2 with linespoints lw 2 pt 7 lc 2 dt 1 title 'batch 8, KV f32', \
     'plots.dat' index 1 using 1:2:(sprintf('%d%%', int($4))) with labels offset 0,0.9 font ',8' notitle, \
     'plots.dat' index 2 using 1:2 with linespoints lw 2 pt 7 lc 3 dt 1 title 'batch 32, KV f32', \
     'plots.dat' index 2 using 1:2:(sprintf('%d%%', int($4))) with labels offset 0,0.9 font ',8' notitle, \
     'plots.dat' index 3 using 1:2 with linespoints lw 2 pt 6 lc 1 dt 2 title 'batch 1, KV int8', \
     'plots.dat' index 4 using 1:2 with linespoints lw 2 pt 6 lc 2 dt 2 title 'batch 8, KV int8', \
     'plots.dat' index 5 using 1:2 with linespoints lw 2 pt 6 lc 3 dt 2 title 'batch 32, KV int8'

set output 'bound_vs_footprint.png'
set title '110M: decode tokens/s as a fraction of the point''s bound'
set ylabel 'tokens/s / bound'
unset logscale y
set yrange [0:*]
set arrow 1 from graph 0, first 1 to graph 1, first 1 nohead dt 3 lc 'gray'
plot 'plots.dat' index 0 using 1:3 with linespoints lw 2 pt 7 lc 1 dt 1 title 'batch 1, KV f32', \
     'plots.dat' index 1 using 1:3 with linespoints lw 2 pt 7 lc 2 dt 1 title 'batch 8, KV f32', \
     'plots.dat' index 2 using 1:3 with linespoints lw 2 pt 7 lc 3 dt 1 title 'batch 32, KV f32', \
     'plots.dat' index 3 using 1:3 with linespoints lw 2 pt 6 lc 1 dt 2 title 'batch 1, KV int8', \
     'plots.dat' index 4 using 1:3 with linespoints lw 2 pt 6 lc 2 dt 2 title 'batch 8, KV int8', \
     'plots.dat' index 5 using 1:3 with linespoints lw 2 pt 6 lc 3 dt 2 title 'batch 32, KV int8'
