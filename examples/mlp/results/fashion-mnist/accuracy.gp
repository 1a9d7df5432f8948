# accuracy.gp, written by bkn_mlp: `gnuplot accuracy.gp` in this folder makes accuracy.png
set terminal pngcairo size 1200,520 font 'sans,10'
set output 'accuracy.png'
set grid lc rgb '#dddddd'
set xlabel 'epoch'
set ylabel 'test accuracy (%)'
set key below horizontal maxcols 4 font ',9'
$D0_0 << EOD
1 84.380 84.380
2 85.667 85.667
3 87.757 87.757
4 88.457 88.457
5 88.783 88.783
EOD
$D0_1 << EOD
1 85.840 85.403
2 86.940 86.643
3 88.383 88.150
4 89.323 88.900
5 89.540 89.360
EOD
$D0_2 << EOD
1 85.373 84.570
2 87.283 87.023
3 88.190 88.010
4 89.350 88.873
5 89.680 89.323
EOD
$D0_3 << EOD
1 84.743 84.743
2 86.090 86.090
3 87.467 87.467
4 88.487 88.487
5 89.130 89.130
EOD
$D0_4 << EOD
1 84.847 84.847
2 86.157 86.157
3 87.647 87.647
4 88.810 88.810
5 89.190 89.190
EOD
$D0_5 << EOD
1 85.510 85.440
2 87.027 87.053
3 88.360 88.360
4 89.417 89.227
5 89.770 89.637
EOD
$D0_6 << EOD
1 85.440 85.110
2 86.907 86.817
3 88.360 88.177
4 89.363 89.003
5 89.697 89.503
EOD
$D0_7 << EOD
1 85.727 85.457
2 86.937 86.733
3 88.437 88.307
4 89.277 89.020
5 89.723 89.577
EOD
$D1_0 << EOD
1 84.380 84.380
2 85.667 85.667
3 87.757 87.757
4 88.457 88.457
5 88.783 88.783
EOD
$D1_1 << EOD
1 58.513 37.193
2 55.910 38.613
3 60.927 40.980
4 61.430 43.120
5 61.437 43.903
EOD
$D1_2 << EOD
1 71.530 27.030
2 74.407 26.330
3 75.107 25.750
4 75.903 25.947
5 76.510 26.160
EOD
$D1_3 << EOD
1 84.743 84.743
2 86.090 86.090
3 87.467 87.467
4 88.487 88.487
5 89.130 89.130
EOD
$D1_4 << EOD
1 84.847 84.847
2 86.157 86.157
3 87.647 87.647
4 88.810 88.810
5 89.190 89.190
EOD
$D1_5 << EOD
1 84.970 84.767
2 86.957 86.927
3 88.250 88.197
4 89.427 89.487
5 89.787 89.733
EOD
$D1_6 << EOD
1 70.060 60.610
2 73.197 62.973
3 75.230 64.883
4 75.370 66.247
5 76.187 67.477
EOD
$D1_7 << EOD
1 85.077 84.483
2 86.253 85.977
3 87.517 87.413
4 88.757 88.807
5 89.107 89.220
EOD
set xrange [0.5:5.5]
set xtics 1
set multiplot layout 1,2 title "Fashion-MNIST, MLP 784-512-256-10, 5 epochs, seeds 1,2,3\nsolid: moving statistics, dashed: batch statistics (mean over seeds)"
set yrange [80:90]
set title '(gradient batch, statistics batch) = (128, 128)'
plot $D0_0 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#000000' title 'none', \
     $D0_0 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#000000' notitle, \
     $D0_1 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#1f77b4' title 'bn', \
     $D0_1 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#1f77b4' notitle, \
     $D0_2 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#d62728' title 'brn', \
     $D0_2 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#d62728' notitle, \
     $D0_3 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#2ca02c' title 'gn', \
     $D0_3 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#2ca02c' notitle, \
     $D0_4 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#9467bd' title 'ln', \
     $D0_4 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#9467bd' notitle, \
     $D0_5 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#ff7f0e' title 'bkn:weights', \
     $D0_5 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#ff7f0e' notitle, \
     $D0_6 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#8c564b' title 'bkn:weights:no-input-prior', \
     $D0_6 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#8c564b' notitle, \
     $D0_7 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#17becf' title 'bkn:dense', \
     $D0_7 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#17becf' notitle
set yrange [25:90]
set title '(gradient batch, statistics batch) = (128, 2)'
plot $D1_0 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#000000' title 'none', \
     $D1_0 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#000000' notitle, \
     $D1_1 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#1f77b4' title 'bn', \
     $D1_1 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#1f77b4' notitle, \
     $D1_2 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#d62728' title 'brn', \
     $D1_2 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#d62728' notitle, \
     $D1_3 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#2ca02c' title 'gn', \
     $D1_3 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#2ca02c' notitle, \
     $D1_4 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#9467bd' title 'ln', \
     $D1_4 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#9467bd' notitle, \
     $D1_5 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#ff7f0e' title 'bkn:weights', \
     $D1_5 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#ff7f0e' notitle, \
     $D1_6 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#8c564b' title 'bkn:weights:no-input-prior', \
     $D1_6 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#8c564b' notitle, \
     $D1_7 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#17becf' title 'bkn:dense', \
     $D1_7 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#17becf' notitle
unset multiplot
